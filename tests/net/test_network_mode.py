"""Offline is the default; --internet switches the endpoint to iroh's n0 preset with relays."""

from __future__ import annotations

from typing import Any

import pytest

from blixfs.net import iroh_transport


@pytest.mark.parametrize(("internet", "preset", "relay"), [(False, "minimal", "disabled"), (True, "n0", "default")])
def test_endpoint_options(monkeypatch: pytest.MonkeyPatch, internet: bool, preset: str, relay: str) -> None:
    built: dict[str, Any] = {}
    ffi = iroh_transport._ffi
    monkeypatch.setattr(ffi, "preset_minimal", lambda: "preset:minimal")
    monkeypatch.setattr(ffi, "preset_n0", lambda: "preset:n0")
    monkeypatch.setattr(ffi.RelayMode, "disabled", staticmethod(lambda: "relay:disabled"))
    monkeypatch.setattr(ffi.RelayMode, "default_mode", staticmethod(lambda: "relay:default"))
    monkeypatch.setattr(ffi, "EndpointOptions", lambda **kw: built.update(kw) or kw)
    iroh_transport.endpoint_options(internet=internet, bind_addr="0.0.0.0:4433", secret_key=bytes(32),
                                    alpns=[b"blixfs/sync/1"])
    assert built["preset"] == f"preset:{preset}" and built["relay_mode"] == f"relay:{relay}"
    assert built["bind_addr"] == "0.0.0.0:4433" and built["alpns"] == [b"blixfs/sync/1"]


def test_the_real_options_build_for_both_modes() -> None:
    for internet in (False, True):
        options = iroh_transport.endpoint_options(internet=internet, bind_addr="127.0.0.1:0", secret_key=None,
                                                  alpns=[])
        assert options is not None
