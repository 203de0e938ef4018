"""Pipeline spec validation: every YAML mistake is one PipelineError naming file, line, problem, allowed."""
from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from tokenmill import PipelineError, PipelineSpec, load_spec
from tokenmill.host import PluginEntry, discover_plugins
from tokenmill.options import FilePath, ModelRef, describe_path
from tokenmill.spec import CompileSpec, LimitsSpec

REPO = Path(__file__).resolve().parents[1]
PIPELINES = sorted((REPO / "pipelines").glob("*.yaml"))


def write(tmp_path: Path, text: str, name: str = "pipe.yaml") -> Path:
    """Write ``text`` (dedented; its first line is line 1) to ``tmp_path/name``."""
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def error_of(path: Path | dict) -> PipelineError:
    with pytest.raises(PipelineError) as info:
        load_spec(path)
    return info.value


def assert_at(err: PipelineError, path: Path, line: int) -> str:
    """The error points at ``path:line`` (attributes and message); returns the message."""
    msg = str(err)
    assert err.source == str(path)
    assert err.line == line, msg
    assert msg.startswith(f"{path}:{line}: "), msg
    assert path.name in msg
    return msg


def require_sjf() -> None:
    if "sjf" not in discover_plugins():
        pytest.fail("the example plugin 'sjf' is not installed; run: pip install -e examples/tokenmill-sjf --no-deps")


# ----------------------------------------------------------------------------------------- valid specs
def test_minimal_file_gets_defaults(tmp_path):
    path = write(tmp_path, """
        model: smollm2-135m-instruct
    """)
    spec = load_spec(path)
    assert isinstance(spec, PipelineSpec)
    assert spec.model == "smollm2-135m-instruct"
    assert spec.source == str(path)
    assert spec.plugins == [] and spec.order == {}
    assert spec.limits == LimitsSpec() and spec.compile == CompileSpec()


def test_load_spec_accepts_a_dict():
    data = {"name": "from-dict", "model": "some/model", "dtype": "bfloat16", "seed": 7,
            "limits": {"max_num_seqs": 3}, "compile": {"enabled": True, "mode": "reduce-overhead"},
            "plugins": ["fcfs", {"contiguous_kv": {"max_num_seqs": 2}}]}
    spec = load_spec(data)
    assert spec.source == "<dict>"
    assert (spec.name, spec.model, spec.dtype, spec.seed) == ("from-dict", "some/model", "bfloat16", 7)
    assert spec.limits.max_num_seqs == 3 and spec.limits.max_model_len == LimitsSpec().max_model_len
    assert spec.compile.enabled and spec.compile.mode == "reduce-overhead"
    assert [p.name for p in spec.plugins] == ["fcfs", "contiguous_kv"]
    assert spec.plugins[0].options is not None
    assert spec.plugins[1].options.max_num_seqs == 2
    assert spec.plugins[1].entry.name == "contiguous_kv"


def test_dict_errors_name_the_dict():
    err = error_of({"model": "m", "limits": {"max_num_seqs": 0}})
    assert err.source == "<dict>" and err.line is None
    assert str(err).startswith("<dict>: ")
    assert "max_num_seqs must be >= 1" in str(err)


@pytest.mark.parametrize("path", PIPELINES, ids=[p.name for p in PIPELINES])
def test_shipped_pipelines_validate(path):
    spec = load_spec(path)
    assert spec.model and spec.source == str(path)


def test_shipped_pipelines_exist():
    assert REPO / "pipelines" / "default.yaml" in PIPELINES


# ----------------------------------------------------------------------------------------- errors
def test_yaml_syntax_error(tmp_path):
    path = write(tmp_path, """
        name: broken
        model: m
          limits: 3
    """)
    msg = assert_at(error_of(path), path, 3)
    assert "YAML syntax error" in msg
    assert "column" in msg
    assert "mapping values are not allowed" in msg


def test_duplicate_key(tmp_path):
    path = write(tmp_path, """
        name: dup
        model: m
        model: other
    """)
    msg = assert_at(error_of(path), path, 3)
    assert "duplicate key 'model'" in msg


def test_unknown_top_level_key_suggests_closest(tmp_path):
    path = write(tmp_path, """
        # a comment keeps line numbers honest
        name: typo
        model: m
        limit: {max_num_seqs: 2}
    """)
    msg = assert_at(error_of(path), path, 4)
    assert "unknown key 'limit'" in msg
    assert "did you mean 'limits'?" in msg
    assert "allowed keys:" in msg
    for key in ("name", "model", "dtype", "device", "plugins", "order", "compile", "limits"):
        assert key in msg.split("allowed keys:")[1]


def test_missing_model(tmp_path):
    path = write(tmp_path, """
        name: no-model
        dtype: float32
    """)
    msg = assert_at(error_of(path), path, 1)
    assert "'model' is required" in msg
    assert "alias" in msg and "HF model directory" in msg and ".gguf" in msg and "hub id" in msg


def test_empty_model_is_missing(tmp_path):
    path = write(tmp_path, """
        name: x
        model: "  "
    """)
    msg = assert_at(error_of(path), path, 2)
    assert "'model' is required" in msg


def test_document_must_be_a_mapping(tmp_path):
    path = write(tmp_path, """
        - model: m
    """)
    msg = assert_at(error_of(path), path, 1)
    assert "must be a mapping" in msg and "got list" in msg


def test_bad_dtype_lists_allowed(tmp_path):
    path = write(tmp_path, """
        model: m
        dtype: float64
    """)
    msg = assert_at(error_of(path), path, 2)
    assert "'dtype' must be one of float32, float16, bfloat16, auto" in msg and "'float64'" in msg


def test_unknown_plugin_suggests_closest_and_lists_available(tmp_path):
    path = write(tmp_path, """
        name: x
        model: m
        plugins:
          - contiguous_kv
          - fcfss
    """)
    msg = assert_at(error_of(path), path, 5)
    assert "unknown plugin 'fcfss'" in msg
    assert "did you mean 'fcfs'?" in msg
    available = msg.split("available plugins:")[1]
    assert [n.strip() for n in available.split(",")] == sorted(discover_plugins())
    for name in ("fcfs", "contiguous_kv", "sampler"):
        assert name in available


def test_plugin_listed_twice(tmp_path):
    path = write(tmp_path, """
        model: m
        plugins:
          - fcfs
          - fcfs
    """)
    msg = assert_at(error_of(path), path, 4)
    assert "plugin 'fcfs' is listed twice" in msg


def test_bad_plugin_option_type(tmp_path):
    path = write(tmp_path, """
        name: x
        model: m
        plugins:
          - fcfs
          - contiguous_kv:
              max_num_seqs: "x"
    """)
    msg = assert_at(error_of(path), path, 6)
    assert "option 'max_num_seqs' of plugin 'contiguous_kv'" in msg
    assert "must be int | null" in msg
    assert "got 'x' (str)" in msg


def test_bool_is_not_an_int_option(tmp_path):
    path = write(tmp_path, """
        model: m
        plugins:
          - contiguous_kv: {max_num_seqs: true}
    """)
    msg = assert_at(error_of(path), path, 3)
    assert "must be int | null" in msg and "got True (bool)" in msg


def test_bad_plugin_option_value(tmp_path):
    path = write(tmp_path, """
        name: x
        model: m
        plugins:
          - contiguous_kv: {max_num_seqs: 0}
    """)
    msg = assert_at(error_of(path), path, 4)
    assert "bad value for plugin 'contiguous_kv'" in msg
    assert "max_num_seqs must be >= 1, got 0" in msg


def test_unknown_plugin_option(tmp_path):
    path = write(tmp_path, """
        name: x
        model: m
        plugins:
          - contiguous_kv:
              max_num_seqs: 2
              max_num_seq: 4
    """)
    msg = assert_at(error_of(path), path, 6)
    assert "unknown option 'max_num_seq' for plugin 'contiguous_kv'" in msg
    assert "did you mean 'max_num_seqs'?" in msg
    assert "allowed: max_num_seqs" in msg


def test_options_for_a_plugin_without_options(tmp_path):
    path = write(tmp_path, """
        model: m
        plugins:
          - fcfs:
              speed: 3
    """)
    msg = assert_at(error_of(path), path, 4)
    assert "unknown option 'speed' for plugin 'fcfs'" in msg and "allowed: none" in msg


def test_plugin_options_must_be_a_mapping(tmp_path):
    path = write(tmp_path, """
        model: m
        plugins:
          - contiguous_kv: [1, 2]
    """)
    msg = assert_at(error_of(path), path, 3)
    assert "options of plugin 'contiguous_kv' must be a mapping" in msg and "got list" in msg


def test_bad_limits_key(tmp_path):
    path = write(tmp_path, """
        name: x
        model: m
        limits:
          max_model_len: 512
          max_seqs: 4
    """)
    msg = assert_at(error_of(path), path, 5)
    assert "unknown option 'max_seqs' for 'limits'" in msg
    assert "did you mean 'max_num_seqs'?" in msg
    assert "allowed: max_model_len, max_num_batched_tokens, max_num_seqs" in msg


def test_bad_limits_type(tmp_path):
    path = write(tmp_path, """
        model: m
        limits:
          max_model_len: 512
          max_num_batched_tokens: 1.5
    """)
    msg = assert_at(error_of(path), path, 4)
    assert "option 'max_num_batched_tokens' of 'limits' must be int" in msg and "got 1.5 (float)" in msg


def test_bad_limits_value(tmp_path):
    path = write(tmp_path, """
        name: x
        model: m
        limits: {max_num_seqs: 0}
    """)
    msg = assert_at(error_of(path), path, 3)
    assert "bad value for 'limits'" in msg and "max_num_seqs must be >= 1, got 0" in msg


def test_block_valued_key_points_at_the_key(tmp_path):
    path = write(tmp_path, """
        model: m
        limit:
          max_num_seqs: 2
    """)
    assert_at(error_of(path), path, 2)


def test_bad_limits_value_points_at_the_offending_key(tmp_path):
    path = write(tmp_path, """
        model: m
        limits:
          max_model_len: 512
          max_num_seqs: 0
    """)
    assert_at(error_of(path), path, 4)


def test_bad_compile_key(tmp_path):
    path = write(tmp_path, """
        model: m
        compile:
          enabled: true
          fullgrph: true
    """)
    msg = assert_at(error_of(path), path, 4)
    assert "unknown option 'fullgrph' for 'compile'" in msg and "did you mean 'fullgraph'?" in msg
    assert "allowed: backend, buckets, dynamic, enabled, fullgraph, kv_multiple, mode" in msg


def test_bad_compile_value(tmp_path):
    path = write(tmp_path, """
        model: m
        compile:
          enabled: true
          mode: fast
    """)
    msg = assert_at(error_of(path), path, 4)
    assert "option 'mode' of 'compile' must be" in msg and "got 'fast' (str)" in msg
    for mode in ("'default'", "'reduce-overhead'", "'max-autotune'", "'max-autotune-no-cudagraphs'", "null"):
        assert mode in msg


def test_bad_compile_buckets(tmp_path):
    path = write(tmp_path, """
        model: m
        compile: {buckets: [4, 2]}
    """)
    msg = assert_at(error_of(path), path, 2)
    assert "bad value for 'compile'" in msg and "buckets must be increasing positive integers" in msg


def test_two_choose_one_plugins_need_order(tmp_path):
    require_sjf()
    path = write(tmp_path, """
        name: x
        model: m
        plugins: [fcfs, sjf]
    """)
    msg = assert_at(error_of(path), path, 3)
    assert "plugins ['fcfs', 'sjf'] all answer the choose-one hook 'schedule'" in msg
    assert "order: {schedule: [fcfs, sjf]}" in msg
    assert "first non-None result wins" in msg


def test_order_resolves_the_conflict(tmp_path):
    require_sjf()
    path = write(tmp_path, """
        name: x
        model: m
        plugins:
          - fcfs
          - sjf
        order:
          schedule: [sjf, fcfs]
    """)
    spec = load_spec(path)
    assert [p.name for p in spec.plugins] == ["fcfs", "sjf"]
    assert spec.order == {"schedule": ["sjf", "fcfs"]}


def test_partial_order_is_not_enough(tmp_path):
    require_sjf()
    path = write(tmp_path, """
        model: m
        plugins: [fcfs, sjf]
        order: {schedule: [sjf]}
    """)
    msg = assert_at(error_of(path), path, 3)
    assert "all answer the choose-one hook 'schedule'" in msg


def test_order_names_a_plugin_not_in_the_pipeline(tmp_path):
    path = write(tmp_path, """
        name: x
        model: m
        plugins:
          - fcfs
        order:
          schedule: [fcfs, sjf]
    """)
    msg = assert_at(error_of(path), path, 6)
    assert "'order.schedule' names 'sjf'" in msg
    assert "not in this pipeline's plugins (fcfs)" in msg


def test_order_names_an_unknown_hook(tmp_path):
    path = write(tmp_path, """
        model: m
        plugins: [fcfs]
        order:
          schedul: [fcfs]
    """)
    msg = assert_at(error_of(path), path, 4)
    assert "unknown choose-one hook 'schedul'" in msg and "did you mean 'schedule'?" in msg
    assert "allowed:" in msg and "schedule" in msg.split("allowed:")[1]


def test_order_must_be_a_mapping(tmp_path):
    path = write(tmp_path, """
        model: m
        plugins: [fcfs]
        order: [fcfs]
    """)
    msg = assert_at(error_of(path), path, 3)
    assert "'order' must map a hook name to a list of plugin names" in msg


def test_unreadable_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    err = error_of(missing)
    assert str(err).startswith(f"{missing}: cannot read pipeline file")


# ----------------------------------------------------------------------------------------- relative paths
class PathsPlugin:
    """An inline plugin with a path option, a model option and a plain string option."""

    name = "paths"

    @dataclass
    class Options:
        data: FilePath | None = None
        model: ModelRef = "self_int4"
        label: str = "a/b"

    def __init__(self, options=None) -> None:
        self.options = options


def paths_catalog() -> dict:
    return {**discover_plugins(), "paths": PluginEntry("paths", f"{__name__}:PathsPlugin", "tests")}


def test_shipped_medusa_heads_resolve_against_the_pipeline_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anywhere but the repository
    spec = load_spec(REPO / "pipelines" / "medusa.yaml")
    heads = next(p.options.heads for p in spec.plugins if p.name == "medusa")
    assert Path(heads) == REPO / "pipelines" / "medusa" / "smollm2-135m-instruct"
    assert (Path(heads) / "medusa_config.json").is_file()


def test_relative_paths_in_a_file_resolve_against_its_directory(tmp_path, monkeypatch):
    sub = tmp_path / "conf"
    sub.mkdir()
    (sub / "models").mkdir()
    (sub / "models" / "m.gguf").write_bytes(b"")
    path = write(sub, """
        model: models/m.gguf
        plugins:
          - paths: {data: heads/x, model: models/m.gguf, label: heads/x}
    """)
    monkeypatch.chdir(tmp_path)
    spec = load_spec(path, catalog=paths_catalog())
    opts = spec.plugins[0].options
    assert Path(spec.model) == sub / "models" / "m.gguf"
    assert Path(opts.data) == sub / "heads" / "x"          # a path resolves even when it does not exist yet
    assert Path(opts.model) == sub / "models" / "m.gguf"
    assert opts.label == "heads/x"                          # a plain string option is left alone
    assert "'heads/x' resolved against the pipeline file's directory" in describe_path(opts.data)
    assert str(sub) in describe_path(opts.data)


def test_model_names_and_absolute_paths_stay_as_written(tmp_path):
    path = write(tmp_path, f"""
        model: smollm2-135m-instruct
        plugins:
          - paths: {{data: {tmp_path / 'abs'}, model: org/some-model}}
    """)
    spec = load_spec(path, catalog=paths_catalog())
    opts = spec.plugins[0].options
    assert spec.model == "smollm2-135m-instruct"
    assert opts.data == str(tmp_path / "abs") and opts.model == "org/some-model"
    assert load_spec({"model": "org/some-model"}).model == "org/some-model"


def test_dict_paths_resolve_against_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = load_spec({"model": "some/model", "plugins": [{"paths": {"data": "d"}}]}, catalog=paths_catalog())
    data = spec.plugins[0].options.data
    assert Path(data) == tmp_path / "d"
    assert "resolved against the working directory" in describe_path(data)


def test_missing_medusa_heads_error_names_the_written_path_and_the_base(tmp_path):
    from tokenmill.plugins.speculative.medusa import MedusaHeads

    path = write(tmp_path, """
        model: smollm2-135m-instruct
        plugins:
          - medusa: {heads: nowhere/heads}
    """)
    heads = load_spec(path).plugins[0].options.heads
    with pytest.raises(PipelineError) as info:
        MedusaHeads.load(heads, hidden_size=8, vocab_size=16)
    msg = str(info.value)
    assert str(tmp_path / "nowhere" / "heads") in msg
    assert "'nowhere/heads' resolved against the pipeline file's directory" in msg


def test_resolved_paths_survive_copies_and_pickles(tmp_path):
    import copy
    import pickle
    from dataclasses import asdict

    path = write(tmp_path, """
        model: smollm2-135m-instruct
        plugins:
          - medusa: {heads: h}
    """)
    opts = load_spec(path).plugins[0].options
    for clone in (copy.deepcopy(opts.heads), pickle.loads(pickle.dumps(opts.heads)), asdict(opts)["heads"]):
        assert clone == str(tmp_path / "h") and describe_path(clone) == describe_path(opts.heads)
