from __future__ import annotations

import re
from pathlib import Path

import pytest

from esper_async.blueprints import Blueprint, SlotContract
from esper_async.errors import StoreError
from esper_async.store import STORE_ENV_VAR, default_store_path, kernel_key

BP = Blueprint("mlp", {"hidden_mult": 2})
CONTRACT = SlotContract("linear", (8,))


def _key(**changes: object) -> str:
    args: dict[str, object] = {
        "blueprint": BP,
        "contract": CONTRACT,
        "torch_version": "2.13.0",
        "device_kind": "cpu",
        "optimizer_options": {"forms": ["export"], "budget_s": 1.5},
    }
    args.update(changes)
    return kernel_key(
        args["blueprint"],  # type: ignore[arg-type]
        args["contract"],  # type: ignore[arg-type]
        torch_version=args["torch_version"],  # type: ignore[arg-type]
        device_kind=args["device_kind"],  # type: ignore[arg-type]
        optimizer_options=args["optimizer_options"],  # type: ignore[arg-type]
    )


def test_key_is_a_stable_sha256_hex() -> None:
    key = _key()
    assert re.fullmatch(r"[0-9a-f]{64}", key), key
    assert key == _key()
    assert key == _key(optimizer_options={"budget_s": 1.5, "forms": ("export",)})


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"blueprint": Blueprint("mlp", {"hidden_mult": 4})}, id="blueprint"),
        pytest.param({"contract": SlotContract("linear", (16,))}, id="contract-shape"),
        pytest.param({"contract": SlotContract("linear", (8,), "float64")}, id="contract-dtype"),
        pytest.param({"torch_version": "2.11.0"}, id="torch-version"),
        pytest.param({"device_kind": "cuda"}, id="device-kind"),
        pytest.param({"optimizer_options": {}}, id="optimizer-options"),
    ],
)
def test_every_input_changes_the_key(change: dict[str, object]) -> None:
    assert _key(**change) != _key()


def test_options_that_are_not_json_are_rejected() -> None:
    with pytest.raises(StoreError, match=r"optimizer_options\.when"):
        _key(optimizer_options={"when": object()})
    with pytest.raises(StoreError, match="finite"):
        _key(optimizer_options={"budget_s": float("nan")})


def test_default_path_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(STORE_ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert default_store_path() == tmp_path / "cache" / "esper_async" / "kernels"
    assert default_store_path(tmp_path / "run") == tmp_path / "run" / "kernels"
    monkeypatch.setenv(STORE_ENV_VAR, str(tmp_path / "shared"))
    assert default_store_path(tmp_path / "run") == tmp_path / "shared"
    monkeypatch.delenv(STORE_ENV_VAR)
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_store_path() == tmp_path / "home" / ".cache" / "esper_async" / "kernels"
