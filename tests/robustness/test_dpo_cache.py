"""The DPO reference-log-prob cache is checksummed like checkpoints: a corrupt or unchecked entry is
recomputed with a warning, never used."""
import logging

import torch

from fusedrl.stages.cache import CHECKSUM_KEY, load_tensors, save_tensors

from tests.robustness._helpers import argv, cli


def test_roundtrip_and_checksum_in_the_metadata(tmp_path):
    path = tmp_path / "c.safetensors"
    values = {"ref_logp": torch.randn(7, dtype=torch.float64), "b": torch.arange(3)}
    save_tensors(path, values)
    loaded = load_tensors(path)
    assert set(loaded) == set(values) and all(torch.equal(loaded[k], values[k]) for k in values)
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as handle:
        assert len(handle.metadata()[CHECKSUM_KEY]) == 64


def test_a_flipped_byte_in_the_values_is_detected(tmp_path, caplog):
    path = tmp_path / "c.safetensors"
    save_tensors(path, {"ref_logp": torch.linspace(-3, -1, 50, dtype=torch.float32)})
    raw = bytearray(path.read_bytes())
    raw[-7] ^= 0x40  # inside the last float: still a valid safetensors file
    path.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="fusedrl"):
        assert load_tensors(path) is None
    assert "fails its checksum" in caplog.text


def test_an_entry_without_checksum_or_truncated_is_not_used(tmp_path, caplog):
    from safetensors.torch import save_file
    path = tmp_path / "old.safetensors"
    save_file({"ref_logp": torch.zeros(4)}, str(path))
    with caplog.at_level(logging.WARNING, logger="fusedrl"):
        assert load_tensors(path) is None
        assert "no checksum" in caplog.text
        save_tensors(path, {"ref_logp": torch.zeros(4)})
        path.write_bytes(path.read_bytes()[:-5])
        assert load_tensors(path) is None
        assert "unreadable" in caplog.text


def test_a_dpo_run_recomputes_a_corrupt_cache(tmp_path, capsys):
    shared = tmp_path / "ref_cache"
    cache = f"--dpo.ref_cache_dir={shared}"
    code, _, err = cli(argv("dpo_tiny", tmp_path / "a", "--loop.max_steps=1", cache), capsys)
    assert code == 0, err
    entries = sorted(shared.glob("*.safetensors"))
    assert entries
    good = {p: load_tensors(p)["ref_logp"].clone() for p in entries}
    for path in entries:
        raw = bytearray(path.read_bytes())
        raw[-3] ^= 0x10
        path.write_bytes(bytes(raw))
    code, _, err = cli(argv("dpo_tiny", tmp_path / "b", "--loop.max_steps=1", cache), capsys)
    assert code == 0, err
    assert "fails its checksum (corrupt); recomputing" in err
    for path, values in good.items():  # recomputed and rewritten: equal to the first run's
        again = load_tensors(path)["ref_logp"]
        assert torch.equal(again, values), (again - values).abs().max()
