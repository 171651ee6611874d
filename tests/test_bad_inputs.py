"""Bad input: every malformed study file and argument combination gives exit code 2, ONE line on stderr
that names the file (or the option) and the field, no traceback, and writes nothing.

Each case runs the real `peer-sweeps` command (typer's CliRunner; a few through a subprocess to prove
that no traceback reaches stderr) in an empty working directory, with `--out` pointing into it, and
checks that no file appeared or changed there or in the data root. Ray is never started: the runner's
Tune and Ray entry points raise if a case gets that far.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import study_dict

REPO = Path(__file__).resolve().parents[1]
PEER = {"num_experts": 1024, "heads": 2, "top_k": 4, "query_dim": 16}


def edit(*changes):
    """A study case: the small study with each `change(study_dict)` applied."""
    def change_all(study):
        for change in changes:
            change(study)

    return ("study", change_all)


def raw(text: str | bytes):
    """A study case: the study file's exact content."""
    return ("raw", text)


def _set(path: str, value):
    def change(study):
        *parents, last = path.split(".")
        node = study
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return change


def _drop(key: str):
    return lambda study: study.pop(key)


def _ablation(**design):
    def change(study):
        study["methods"] = {"peer": dict(PEER)}
        study["design"] = {"kind": "ablation", "method": "peer", "size": {"d_model": 16, "n_layers": 1},
                           "axes": {"num_experts": [256, 1024]}, "tokens": 4096, **design}
    return change


# (id, study, extra arguments of `run` or a whole command line, fragments the message must contain)
# `{study}` / `{out}` / `{tmp}` in arguments and fragments are filled in per case.
STUDY_CASES = [
    ("yaml-syntax", raw("name: tiny\ntraining: {seq_len: 32\n"), ["invalid YAML", "line 3"]),
    ("yaml-tab-indent", raw("name: tiny\ntraining:\n\tseq_len: 32\n"), ["invalid YAML", "line 3"]),
    ("yaml-duplicate-key", raw("name: tiny\nname: other\n"), ["invalid YAML", "line 2", "'name' given twice"]),
    ("not-a-mapping", raw("- dense\n- peer\n"), ["expected a mapping of study fields, got list"]),
    ("empty-file", raw(""), ["expected a mapping of study fields"]),
    ("not-utf8", raw(b"name: tiny\n# \xff\xfe\n"), ["not a UTF-8 text file"]),
    ("int-is-text", edit(_set("training.seq_len", "long")), ["training.seq_len", "valid integer"]),
    ("int-is-quoted-number", edit(_set("training.seq_len", "32")), ["training.seq_len"]),
    ("float-is-text", edit(_set("training.lr", "fast")), ["training.lr"]),
    ("list-is-scalar", edit(_set("design.budgets", 1.0e9)), ["design.budgets"]),
    ("bool-is-text", edit(_set("methods", {"peer": {**PEER, "query_bn": "maybe"}})), ["methods.peer.query_bn"]),
    ("unknown-top-key", edit(_set("trainig", {"lr": 1e-3})), ["trainig: unknown key", "did you mean 'training'"]),
    ("unknown-nested-key", edit(_set("training.seq_length", 64)),
     ["training.seq_length: unknown key", "did you mean 'seq_len'"]),
    ("unknown-method-key", edit(_set("methods", {"peer": {**PEER, "num_expert": 1024}})),
     ["methods.peer.num_expert: unknown key", "did you mean 'num_experts'"]),
    ("unknown-method", edit(_set("methods", {"peeer": {}})), ["methods.peeer"]),
    ("missing-design", edit(_drop("design")), ["design: required field is missing"]),
    ("bad-name", edit(_set("name", "my study!")), ["name: "]),
    ("negative-budget", edit(_set("design.budgets", [-1.0e9])), ["design.budgets", "must be positive"]),
    ("zero-budget", edit(_set("design.budgets", [0.0])), ["design.budgets", "must be positive"]),
    ("budget-below-one-step", edit(_set("design.budgets", [1.0e6])),
     ["cell [dense d16 L1 1e+06 FLOPs]", "smaller than one step"]),
    ("budget-missed-by-whole-steps", edit(_set("design.budgets", [2.8e7])),
     ["cell [dense d16 L1 2.8e+07 FLOPs]", "miss the budget"]),
    ("experts-not-square", edit(_set("methods", {"peer": {**PEER, "num_experts": 1000}})),
     ["methods.peer: num_experts=1000 is not a perfect square"]),
    ("top-k-above-sqrt", edit(_set("methods", {"peer": {**PEER, "num_experts": 16, "top_k": 8}})),
     ["methods.peer: top_k=8", "sqrt(num_experts)=4"]),
    ("batch-not-multiple-of-seq-len", edit(_set("training.batch_tokens", 250)),
     ["training.batch_tokens", "not a multiple of seq_len"]),
    ("batch-does-not-divide-over-workers", edit(_set("resources.workers_per_trial", 3)),
     ["training.batch_tokens", "resources.workers_per_trial=3"]),
    ("micro-batch-does-not-divide", edit(_set("training.micro_batch_size", 3)), ["training.micro_batch_size"]),
    ("d-model-not-multiple-of-head-dim", edit(_set("design.sizes", [{"d_model": 20, "n_layers": 1}])),
     ["cell [dense d20 L1", "head_dim"]),
    ("empty-budgets", edit(_set("design.budgets", [])), ["design.budgets"]),
    ("empty-sizes", edit(_set("design.sizes", [])), ["design.sizes"]),
    ("empty-methods", edit(_set("methods", {})), ["methods"]),
    ("empty-seeds", edit(_set("training.seeds", [])), ["training.seeds", "at least one seed"]),
    ("ablation-without-axes", edit(_ablation(axes={})), ["design", "at least one axis"]),
    ("ablation-budgets-and-tokens", edit(_ablation(budgets=[1.0e9])), ["design", "exactly one of budgets or tokens"]),
    ("ablation-method-not-configured", edit(_ablation(method="pkm")), ["design.method 'pkm'"]),
    ("zero-stage-out-of-range", edit(_set("training.zero_stage", 5)), ["training.zero_stage"]),
    ("row-sparse-tables-under-zero-3", edit(_set("training.expert_tables", "row_sparse"),
                                            _set("training.zero_stage", 3)),
     ["training", "expert_tables: row_sparse needs zero_stage 1 or 2 (got 3)"]),
    ("row-sparse-tables-in-bf16", edit(_set("training.expert_tables", "row_sparse"),
                                       _set("training.precision", "bf16")),
     ["training", "expert_tables: row_sparse needs fp32 tables"]),
    ("row-sparse-tables-auto-precision-on-gpu", edit(_set("training.expert_tables", "row_sparse"),
                                                     _set("resources.gpus_per_worker", 1)),
     ["training.expert_tables: row_sparse needs fp32 tables", "precision auto is bf16 on GPU workers"]),
    ("unknown-expert-tables", edit(_set("training.expert_tables", "sparse")), ["training.expert_tables"]),
    ("zero-evals", edit(_set("training.evals", 0)), ["training.evals"]),
    ("zero-max-concurrent", edit(_set("resources.max_concurrent", 0)), ["resources.max_concurrent"]),
    ("negative-lr", edit(_set("training.lr", -1.0e-3)), ["training.lr"]),
    ("bad-wandb-mode", edit(_set("tracking.wandb_mode", "sometimes")), ["tracking.wandb_mode"]),
    ("unknown-data-suite", edit(_set("data.suite", "fixtrue")),
     ["data.suite", "unknown data suite 'fixtrue'", "did you mean 'fixture'"]),
    # a suite that needs a dataset hub is never prepared by `run` (a shipped one is: see ARGUMENT_CASES)
    ("hub-suite-not-prepared", edit(_set("data.suite", "c4"), _set("data.root", "{tmp}/no-data")),
     ["data.suite", "'c4' (bpe512) is not prepared under {tmp}/no-data: run `peer-sweeps data prepare --study"]),
]

# (id, command line, fragments); the good small study is at {study}
ARGUMENT_CASES = [
    ("study-missing", ["run", "{tmp}/absent.yaml", "--out", "{out}"], ["{tmp}/absent.yaml: no such file"]),
    ("study-is-a-directory", ["run", "{tmp}", "--out", "{out}"], ["{tmp}: is a directory, not a study file"]),
    ("study-path-through-a-file", ["run", "{tmp}/study.yaml/x.yaml", "--out", "{out}"],
     ["{tmp}/study.yaml/x.yaml: cannot read: Not a directory"]),
    ("out-is-a-file", ["run", "{study}", "--out", "{tmp}/a-file"], ["{tmp}/a-file: results directory is a file"]),
    ("out-under-a-file", ["run", "{study}", "--out", "{tmp}/a-file/sub"],
     ["{tmp}/a-file/sub: cannot create results directory"]),
    ("wandb-bogus", ["run", "{study}", "--out", "{out}", "--wandb", "bogus"], ["--wandb: 'bogus' is not one of"]),
    ("wandb-env-bogus", ["run", "{study}", "--out", "{out}", "ENV:WANDB_MODE=bogus"], ["WANDB_MODE='bogus'"]),
    ("max-concurrent-zero", ["run", "{study}", "--out", "{out}", "--max-concurrent", "0"],
     ["'--max-concurrent'", "greater than or equal to 1"]),
    ("max-concurrent-not-a-number", ["run", "{study}", "--out", "{out}", "--max-concurrent", "two"],
     ["'--max-concurrent'", "valid integer"]),
    ("unknown-option", ["run", "{study}", "--out", "{out}", "--max-concurent", "1"],
     ["No such option: --max-concurent"]),
    ("missing-study-argument", ["run", "--out", "{out}"], ["Missing argument 'study'", "peer-sweeps run --help"]),
    ("unknown-command", ["rnu", "{study}"], ["No such command 'rnu'"]),
    ("trial-not-in-plan", ["trial", "{study}", "ffffffffffff", "--out", "{out}"],
     ["{study}: trial 'ffffffffffff' is not in the plan"]),
    ("trial-prefix-ambiguous", ["trial", "{study}", "", "--out", "{out}"], ["{study}: trial '' is ambiguous"]),
    ("trial-bad-study", ["trial", "{tmp}/absent.yaml", "abc", "--out", "{out}"], ["{tmp}/absent.yaml: no such file"]),
    ("plan-infeasible-cell", ["plan", "{tmp}/bad.yaml"], ["{tmp}/bad.yaml: ", "perfect square"]),
    ("status-missing-dir", ["status", "{tmp}/absent"], ["{tmp}/absent: not a results directory"]),
    ("status-on-a-file", ["status", "{tmp}/a-file"], ["{tmp}/a-file: results directory is a file"]),
    ("status-dir-without-study", ["status", "{tmp}/empty-dir"], ["{tmp}/empty-dir: not a results directory"]),
    ("report-missing-dir", ["report", "{tmp}/absent"], ["{tmp}/absent: no such results directory"]),
    ("report-on-a-file", ["report", "{tmp}/a-file"], ["{tmp}/a-file: not a directory"]),
    ("report-wandb-bogus", ["report", "{tmp}/empty-dir", "--wandb", "bogus"], ["--wandb: 'bogus' is not one of"]),
    ("no-prepare-stops", ["run", "{tmp}/unprepared.yaml", "--out", "{out}", "--no-prepare"],
     ["{tmp}/unprepared.yaml: data.suite: data suite 'fixture' (bpe512) is not prepared under {tmp}/no-data "
      "(--no-prepare): run `peer-sweeps data prepare --study {tmp}/unprepared.yaml`"]),
    ("plan-check-data-no-prepare", ["plan", "{tmp}/unprepared.yaml", "--check-data", "--no-prepare"],
     ["{tmp}/unprepared.yaml: data.suite: ", "(--no-prepare): run `peer-sweeps data prepare --study"]),
    ("prepare-study-missing", ["data", "prepare", "--study", "{tmp}/absent.yaml"], ["{tmp}/absent.yaml: no such file"]),
    ("prepare-study-infeasible", ["data", "prepare", "--study", "{tmp}/bad.yaml"], ["{tmp}/bad.yaml: ", "perfect square"]),
    ("prepare-unknown-suite", ["data", "prepare", "--suite", "fixtrue"], ["unknown data suite 'fixtrue'"]),
    ("prepare-vocab-too-small", ["data", "prepare", "--suite", "fixture", "--vocab-size", "1"],
     ["vocab size must be an integer of at least 258, got 1"]),
]


def _fill(text: str, tmp: Path, study: Path) -> str:
    return text.replace("{tmp}", str(tmp)).replace("{out}", str(tmp / "out")).replace("{study}", str(study))


def _tree(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every file and directory under `roots`: path -> (size, mtime_ns)."""
    state = {}
    for root in roots:
        for path in [root, *root.rglob("*")]:
            st = path.lstat()
            state[str(path)] = (st.st_size if path.is_file() else -1, st.st_mtime_ns if path.is_file() else 0)
    return state


@pytest.fixture
def workspace(tmp_path, data_root, monkeypatch):
    """An empty working directory with a good small study, a bad one, a plain file and an empty dir."""
    import cluster.runtime
    import peer_sweeps.runner

    def never(*args, **kwargs):
        raise AssertionError("a bad input got as far as starting Ray")

    monkeypatch.setattr(peer_sweeps.runner, "_run_tune", never)
    monkeypatch.setattr(cluster.runtime, "ray_session", never)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study_dict(data_root)))
    bad = study_dict(data_root)
    bad["methods"] = {"peer": {**PEER, "num_experts": 1000}}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    unprepared = study_dict(data_root)
    unprepared["data"]["root"] = str(tmp_path / "no-data")
    (tmp_path / "unprepared.yaml").write_text(yaml.safe_dump(unprepared))
    (tmp_path / "a-file").write_text("not a directory\n")
    (tmp_path / "empty-dir").mkdir()
    return tmp_path


def _invoke(argv: list[str], env: dict[str, str]):
    from peer_sweeps.cli import app

    return CliRunner().invoke(app, argv, env=env, prog_name="peer-sweeps")


def _check(result_code: int, stderr: str, stdout: str, fragments: list[str]) -> None:
    lines = stderr.strip().splitlines()
    assert result_code == 2, (result_code, stdout, stderr)
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    assert lines[0].startswith("peer-sweeps: error: "), lines[0]
    assert "Traceback" not in stderr + stdout
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    assert not stdout.strip(), stdout


def _write_case_study(tmp: Path, data_root: Path, kind: str, content) -> Path:
    path = tmp / "case.yaml"
    if kind == "raw":
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    else:
        study = study_dict(data_root)
        content(study)
        path.write_text(_fill(yaml.safe_dump(study, sort_keys=False), tmp, path))
    return path


@pytest.mark.parametrize("case", STUDY_CASES, ids=[c[0] for c in STUDY_CASES])
def test_bad_study_file_exits_2_with_one_line_and_writes_nothing(case, workspace, data_root):
    _, (kind, content), fragments = case
    path = _write_case_study(workspace, data_root, kind, content)
    before = _tree(workspace, data_root)
    result = _invoke(["run", str(path), "--out", str(workspace / "out"), "--max-concurrent", "1"], {})
    _check(result.exit_code, result.stderr, result.stdout, [str(path) + ":"] + [_fill(f, workspace, path) for f in fragments])
    assert _tree(workspace, data_root) == before
    assert not (workspace / "out").exists()


@pytest.mark.parametrize("case", ARGUMENT_CASES, ids=[c[0] for c in ARGUMENT_CASES])
def test_bad_arguments_exit_2_with_one_line_and_write_nothing(case, workspace, data_root):
    _, argv, fragments = case
    study = workspace / "study.yaml"
    env = dict(a[4:].split("=", 1) for a in argv if a.startswith("ENV:"))
    argv = [_fill(a, workspace, study) for a in argv if not a.startswith("ENV:")]
    before = _tree(workspace, data_root)
    result = _invoke(argv, env)
    _check(result.exit_code, result.stderr, result.stdout, [_fill(f, workspace, study) for f in fragments])
    assert _tree(workspace, data_root) == before
    assert not (workspace / "out").exists()


def test_cases_cover_the_issue_list():
    """At least 20 malformed inputs, as the issue asks (here: every case above)."""
    assert len(STUDY_CASES) + len(ARGUMENT_CASES) >= 20


def test_readme_counts_these_cases():
    """README's failure section states how many malformed inputs this file checks."""
    found = re.search(r"(\d+) malformed inputs \((\d+) study files, (\d+) argument", (REPO / "README.md").read_text())
    assert found, "README no longer counts the malformed inputs"
    total, studies, arguments = map(int, found.groups())
    assert (total, studies, arguments) == (len(STUDY_CASES) + len(ARGUMENT_CASES), len(STUDY_CASES), len(ARGUMENT_CASES))


SUBPROCESS_CASES = ["yaml-syntax", "experts-not-square", "study-path-through-a-file", "max-concurrent-zero"]


@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_no_traceback_reaches_stderr_of_the_real_process(name, workspace, data_root):
    """The installed `peer-sweeps` entry point, in its own process: one line on stderr, exit code 2."""
    cases = {c[0]: c for c in STUDY_CASES} | {c[0]: c for c in ARGUMENT_CASES}
    _, spec, fragments = cases[name]
    study = workspace / "study.yaml"
    if isinstance(spec, tuple):  # a study file case
        study = _write_case_study(workspace, data_root, *spec)
        argv = ["run", str(study), "--out", str(workspace / "out")]
        fragments = [str(study) + ":"] + fragments
    else:
        argv = [_fill(a, workspace, study) for a in spec]
    before = _tree(workspace, data_root)
    env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"}
    proc = subprocess.run([sys.executable, "-m", "peer_sweeps.cli", *argv], capture_output=True, text=True,
                          cwd=workspace, env=env | {"PYTHONPATH": str(REPO)}, timeout=120)
    _check(proc.returncode, proc.stderr, proc.stdout, [_fill(f, workspace, study) for f in fragments])
    assert _tree(workspace, data_root) == before
