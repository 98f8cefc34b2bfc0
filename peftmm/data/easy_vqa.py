"""easy-VQA (PyPI ``easy-vqa``, MIT): 64x64 shapes, 13 answers.

Validation images are held out of train by a stable hash of the image id, so no validation
question is about an image seen in training.
"""

from __future__ import annotations

from . import DATASETS, Splits, stable_fraction


@DATASETS.register("easy-vqa")
def load_easy_vqa(spec) -> Splits:
    import easy_vqa

    def examples(questions, paths):
        texts, answers, image_ids = questions
        return [{"image": paths[i], "text": t, "label": a, "image_id": i}
                for t, a, i in zip(texts, answers, image_ids)]

    train = examples(easy_vqa.get_train_questions(), easy_vqa.get_train_image_paths())
    test = examples(easy_vqa.get_test_questions(), easy_vqa.get_test_image_paths())
    held_out = [stable_fraction(f"easy-vqa/{e['image_id']}") < spec.val_fraction for e in train]
    return Splits(train=[e for e, h in zip(train, held_out) if not h],
                  val=[e for e, h in zip(train, held_out) if h],
                  test=test, labels=list(easy_vqa.get_answers()))
