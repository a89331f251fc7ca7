from __future__ import annotations

import esper_async.store as store


def test_all_names_exactly_what_the_package_exports() -> None:
    assert isinstance(store.__all__, tuple)
    public = {n for n in vars(store) if not n.startswith("_")}
    assert set(store.__all__) == public
    assert all(getattr(store, n) is not None for n in store.__all__)
