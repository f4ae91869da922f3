"""The typed config tree: presets, includes, dotted overrides, and errors that name the key."""
import subprocess
import sys

import pytest

from m6rec.config import Config, ConfigError, load_config, parse_overrides, save_config


def test_presets_load(project_root):
    for preset in sorted((project_root / "configs").rglob("*.yaml")):
        cfg = load_config(preset)
        assert isinstance(cfg, Config), preset


def test_dotted_overrides_both_spellings():
    cfg = load_config(None, ["--data.max_items", "50", "--data.stream.seq_len=512", "--data.text.item_repr", "both"])
    assert cfg.data.max_items == 50 and cfg.data.stream.seq_len == 512 and cfg.data.text.item_repr == "both"
    assert parse_overrides(["--a.b", "[1, 2]"]) == {"a": {"b": [1, 2]}}


def test_include_and_later_keys_win(tmp_path):
    (tmp_path / "base.yaml").write_text("data: {max_items: 30, stride: 5}\n")
    (tmp_path / "top.yaml").write_text("include: base.yaml\ndata: {stride: 7}\n")
    cfg = load_config(tmp_path / "top.yaml")
    assert (cfg.data.max_items, cfg.data.stride) == (30, 7)


@pytest.mark.parametrize(
    "override, words",
    [
        (["--data.max_itemz", "5"], ["data.max_itemz", "max_items"]),
        (["--data.max_items", "many"], ["data.max_items", "'many'", "int"]),
        (["--data.text.item_repr", "pixels"], ["data.text.item_repr", "'pixels'", "'text'", "'token'", "'both'"]),
        (["--data.stride", "99"], ["data.stride", "99", "data.max_items"]),
        (["--data.images.size", "60"], ["data.images.size", "60", "patch_size"]),
        (["--data.stream.strict", "maybe"], ["data.stream.strict", "'maybe'", "bool"]),
        (["--data.filters.min_user_interactions", "2"], ["min_user_interactions", "2", ">= 3"]),
        (["--model.attention", "sideways"], ["model.attention", "'sideways'", "'causal'", "'prefix'"]),
        (["--model.n_kv_heads", "two"], ["model.n_kv_heads", "'two'", "int or null"]),
        (["--model.item_proj_layers", "0"], ["model.item_proj_layers", "0", ">= 1"]),
        (["--data.stream.item_marker_loss", "sometimes"], ["data.stream.item_marker_loss", "'sometimes'"]),
    ],
)
def test_errors_name_key_value_and_allowed(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, override)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {max_items: [\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)
    with pytest.raises(ConfigError, match="nowhere.yaml"):
        load_config(tmp_path / "nowhere.yaml")


def test_save_roundtrip(tmp_path):
    cfg = load_config(None, ["--data.max_items", "42"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


def test_cli_reports_config_error_and_exits_2():
    r = subprocess.run(
        [sys.executable, "-m", "m6rec.cli", "prepare", "--data.shard_size", "0"], capture_output=True, text=True
    )
    assert r.returncode == 2
    assert "data.shard_size" in r.stderr and "> 0" in r.stderr


def test_float_written_without_a_dot():
    assert load_config(None, ["--train.peak_flops", "1e11"]).train.peak_flops == 1e11


def test_console_entry_tears_the_process_group_down(tmp_path):
    """`m6rec ...` / launch/*.py exit through cli.entry, which destroys a process group the command
    left up (NCCL warns at exit otherwise); cli.main leaves it up for in-process callers."""
    code = f"""
import atexit, torch.distributed as dist
from m6rec import cli
dist.init_process_group("gloo", init_method="file://{tmp_path}/store", rank=0, world_size=1)
assert cli.main(["config", "--get", "train.steps"]) == 0 and dist.is_initialized()
atexit.register(lambda: print("initialized at exit:", dist.is_initialized()))
cli.entry(["config", "--get", "train.steps"])
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["100", "100", "initialized", "at", "exit:", "False"], r.stdout
