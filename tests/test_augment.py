"""Training-time image augmentation (peftmm/augment.py): what it changes and when it acts."""

import pytest
import tiny
import torch
from helpers import batch_of, build

from peftmm.augment import AugmentSpec, augment_pixels
from peftmm.errors import RecipeError
from peftmm.recipe import from_dict


def test_inactive_spec_returns_the_same_pixels():
    x = torch.randn(3, 3, 32, 32)
    assert augment_pixels(x, AugmentSpec()) is x


def test_augmented_batch_keeps_shape_dtype_and_differs_per_image():
    x = torch.randn(1, 3, 32, 32).expand(4, -1, -1, -1).contiguous()
    out = augment_pixels(x, AugmentSpec(crop_scale=0.5, rotate=20), torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert not torch.allclose(out, x)
    # one random warp per image: four copies of one picture come out four different ways
    assert all(not torch.allclose(out[0], out[i]) for i in range(1, 4))


def test_same_generator_seed_gives_the_same_augmentation():
    x = torch.randn(2, 3, 16, 16)
    spec = AugmentSpec(crop_scale=0.7, rotate=10)
    first = augment_pixels(x, spec, torch.Generator().manual_seed(3))
    again = augment_pixels(x, spec, torch.Generator().manual_seed(3))
    assert torch.equal(first, again)


def test_zoom_only_crop_stays_inside_the_image():
    # A constant image stays constant under any crop of itself (no padding is pulled in).
    x = torch.full((2, 3, 16, 16), 0.25)
    out = augment_pixels(x, AugmentSpec(crop_scale=0.5), torch.Generator().manual_seed(1))
    assert torch.allclose(out, x, atol=1e-6)


def test_recipe_validates_augment_settings(tiny_models):
    base = tiny.recipe(tiny_models["mobilenet_v2"], tiny_models["bert"])
    with pytest.raises(RecipeError, match="crop_scale"):
        from_dict({**base, "vision": {**base["vision"], "augment": {"crop_scale": 1.5}}})
    with pytest.raises(RecipeError, match="did you mean 'rotate'"):
        from_dict({**base, "vision": {**base["vision"], "augment": {"rotation": 5}}})
    with pytest.raises(RecipeError, match="text.augment"):
        from_dict({**base, "text": {**base["text"], "augment": {"rotate": 5}}})


def test_model_augments_only_in_training(tiny_models):
    recipe = tiny.recipe(tiny_models["mobilenet_v2"], tiny_models["bert"],
                         vision_methods=[{"type": "adapter", "reduction_factor": 2}])
    recipe["vision"]["augment"] = {"crop_scale": 0.5, "rotate": 30}
    _, model, splits = build(recipe)
    batch = batch_of(model, splits.train[:4])
    seen = []   # the pixels that reach the vision tower
    model.towers["vision"].register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["pixel_values"].clone()), with_kwargs=True)
    with torch.no_grad():
        model.eval()
        model.encode("vision", batch)
        model.train()
        model.encode("vision", batch)
    assert torch.equal(seen[0], batch["pixel_values"])
    assert seen[1].shape == seen[0].shape and not torch.allclose(seen[1], seen[0])
