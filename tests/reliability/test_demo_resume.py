"""``esper-async demo --resume RUN_DIR`` refuses what it cannot resume, clearly: a demo.json that
is not JSON or holds an invalid option (named), and a run that wrote no checkpoint."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest
import structlog

from esper_async.apps.cli import main
from esper_async.apps.demo import DemoConfig, load_demo_config, run_demo
from esper_async.errors import DemoConfigError
from esper_async.reliability import CheckpointError


@pytest.fixture(autouse=True)
def _keep_logging_config() -> Iterator[None]:
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


def _options() -> dict:
    return DemoConfig(epochs=3, limit=200, use_store=False).to_json()


def _set(key: str, value: object) -> Callable[[dict], object]:
    def change(data: dict) -> object:
        if "." in key:
            outer, inner = key.split(".")
            data[outer][inner] = value
        else:
            data[key] = value
        return data

    return change


def _drop(key: str) -> Callable[[dict], object]:
    def change(data: dict) -> object:
        del data[key]
        return data

    return change


BAD = [
    pytest.param(_set("epochs", -3), "epochs", "integer >= 1, got -3", id="negative-epochs"),
    pytest.param(_set("epochs", "10"), "epochs", "integer >= 1, got '10'", id="epochs-string"),
    pytest.param(_set("epochs", True), "epochs", "integer >= 1", id="epochs-bool"),
    pytest.param(_set("batch_size", 0), "batch_size", "integer >= 1", id="zero-batch"),
    pytest.param(_set("batch_size", 10**20), "batch_size", "integer <= 65536", id="huge-batch"),
    pytest.param(_set("epochs", 10**9), "epochs", "integer <= 100000", id="huge-epochs"),
    pytest.param(_set("controller.blend_epochs", 2**40), "controller.blend_epochs",
                 "integer <= 2147483647", id="huge-controller-int"),
    pytest.param(_set("store", "/tmp/elsewhere"), "store", "outside the run directory",
                 id="store-absolute"),
    pytest.param(_set("store", "../../.."), "store", "outside the run directory",
                 id="store-parent"),
    pytest.param(_set("seed", 2.5), "seed", "integer >= 0", id="float-seed"),
    pytest.param(_set("limit", 5), "limit", "integer >= 100", id="tiny-limit"),
    pytest.param(_set("slots", "conv1"), "slots", "list of module names", id="slots-string"),
    pytest.param(_set("slots", ["conv9"]), "slots", "conv1, conv2, fc1, head", id="unknown-slot"),
    pytest.param(_set("slots", []), "slots", "distinct modules", id="no-slots"),
    pytest.param(_set("use_store", 1), "use_store", "true or false", id="use-store-int"),
    pytest.param(_set("store", 7), "store", "a path or null", id="store-int"),
    pytest.param(_set("device", "bogus"), "device", "is not a device", id="bad-device"),
    pytest.param(_set("controller", [1]), "controller", "JSON object", id="controller-list"),
    pytest.param(_set("controller.blend_epochs", "x"), "controller.blend_epochs",
                 "integer >= 0", id="controller-string"),
    pytest.param(_set("controller.param_rent", float("nan")), "controller.param_rent",
                 "finite number", id="controller-nan"),
    pytest.param(_set("controller.speed", 2), "controller.speed", "unknown option",
                 id="controller-unknown"),
    pytest.param(_set("task", "cifar10"), "task", "unknown option 'task'", id="unknown-task"),
    pytest.param(_drop("seed"), "seed", "option 'seed' is missing", id="missing-key"),
    pytest.param(lambda data: [data], None, "must be a JSON object", id="not-an-object"),
]


@pytest.mark.parametrize(("change", "key", "message"), BAD)
def test_an_invalid_option_in_demo_json_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
    change: Callable[[dict], object], key: str | None, message: str,
) -> None:
    (tmp_path / "demo.json").write_text(json.dumps(change(_options())))
    with pytest.raises(DemoConfigError, match=message) as caught:
        load_demo_config(tmp_path)
    assert caught.value.key == key
    assert caught.value.path == str(tmp_path / "demo.json")
    assert str(tmp_path / "demo.json") in str(caught.value)

    assert main(["demo", "--resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize(
    "text", [pytest.param("{epochs: 3", id="broken"), pytest.param("", id="empty"),
             pytest.param("\udcff", id="not-utf8")],
)
def test_demo_json_that_is_not_json_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str
) -> None:
    path = tmp_path / "demo.json"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(DemoConfigError) as caught:
        load_demo_config(tmp_path)
    assert caught.value.key is None
    assert "is not JSON" in str(caught.value) or "cannot read" in str(caught.value)
    assert main(["demo", "--resume", str(tmp_path)]) == 2
    assert str(path) in capsys.readouterr().err


def test_valid_options_read_back_as_written(tmp_path: Path) -> None:
    written = DemoConfig(epochs=3, seed=4, limit=200, slots=("fc1",), surgery=True)
    (tmp_path / "demo.json").write_text(json.dumps(written.to_json()))
    read = load_demo_config(tmp_path)
    assert read == DemoConfig(**{**written.__dict__, "run_dir": str(tmp_path), "resume": True})


def test_invalid_options_on_the_command_line_are_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["demo", "--epochs", "0", "--no-store"]) == 2
    assert "option 'epochs' must be an integer >= 1, got 0" in capsys.readouterr().err


def test_resuming_a_run_that_wrote_no_checkpoint_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "demo.json").write_text(json.dumps(_options()))
    (tmp_path / "checkpoints" / "static").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="nothing to resume") as caught:
        anyio.run(run_demo, load_demo_config(tmp_path))
    assert str(tmp_path / "checkpoints" / "static") in str(caught.value)
    assert str(tmp_path / "checkpoints" / "growth") in str(caught.value)
    assert main(["demo", "--resume", str(tmp_path)]) == 2
    assert "looked for ckpt-<8-digit epoch>.pt files" in capsys.readouterr().err
    assert not list(tmp_path.glob("checkpoints/*/*.pt"))  # nothing was trained or written


def test_demo_json_nested_deep_is_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "demo.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DemoConfigError, match="nests too deep"):
        load_demo_config(tmp_path)
    assert main(["demo", "--resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "nests too deep" in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_a_store_inside_the_run_directory_is_read_relative_to_it(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "demo.json").write_text(json.dumps({**_options(), "store": "kernels"}))
    assert load_demo_config(run).store == str(run / "kernels")
    (run / "link").symlink_to(tmp_path)  # inside by name, outside once the link is followed
    (run / "demo.json").write_text(json.dumps({**_options(), "store": "link/store"}))
    with pytest.raises(DemoConfigError, match="outside the run directory"):
        load_demo_config(run)
    chosen = str(tmp_path / "mine")
    assert load_demo_config(run, store=chosen).store == chosen  # --store on the command line


def test_a_store_that_is_a_regular_file_is_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "store"
    store.write_text("not a directory")
    argv = ["demo", "--epochs", "1", "--store", str(store), "--run-dir", str(tmp_path / "r")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(store) in err
    assert len(err.strip().splitlines()) == 1
