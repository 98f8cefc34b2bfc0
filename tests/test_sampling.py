"""Image-grouped batches: every example once per epoch, an image's questions never split."""

from peftmm.sampling import ImageGroupedBatchSampler


def test_batches_cover_everything_once_and_keep_images_whole():
    examples = [{"image": f"img{i % 7}", "text": str(i)} for i in range(60)]
    sampler = ImageGroupedBatchSampler(examples, batch_size=16, seed=3)
    epochs = [list(sampler), list(sampler)]
    for batches in epochs:
        assert sorted(i for b in batches for i in b) == list(range(60))
        owner = {}
        for n, batch in enumerate(batches):
            for i in batch:
                assert owner.setdefault(examples[i]["image"], n) == n
        assert len(batches) == len(sampler)
    assert epochs[0] != epochs[1]  # reshuffled each epoch
    again = ImageGroupedBatchSampler(examples, batch_size=16, seed=3)
    assert list(again) == epochs[0]  # ... deterministically from the seed
