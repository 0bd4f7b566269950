"""The runner role: a `Runner` times a compiled module on one device, chosen by a `Where`.

    Where.local()                                   this machine
    Where.rpc("10.0.0.5:9190", "rpi4")              the servers of a key on an RPC tracker
    Where.of_target(target)                         a target's own device
    where.runner(seed=0).run(built, protocol) -> Measurement

`Where` is the one spelling of "where to measure"; the others are built from it: the farm's
`FarmSpec` (`where.farm()`), an RPC session with deadlines for artifacts (`where.session()`),
and the `Runner` (`where.runner()`). A failed run returns a Measurement with `error` set
instead of raising.
"""

from __future__ import annotations

import abc
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from codesign.errors import TargetError

if TYPE_CHECKING:
    from codesign.measurement import Measurement, MeasureProtocol
    from codesign.tvm_backend.build import Built
    from codesign.tvm_backend.runner import base  # the installed name (pyright sees both)


class Runner(abc.ABC):
    """Times compiled modules on one device."""

    @abc.abstractmethod
    def run(self, built: Built, protocol: MeasureProtocol) -> Measurement:
        """Measure `built`; never raises for device-side failures (see Measurement.error)."""

    @property
    def emulated(self) -> bool:
        """True when the device is an emulator: its timings must not drive tuning."""
        return False


@dataclass(frozen=True, slots=True)
class Where:
    """Where modules are timed: this machine (`tracker` and `key` None), or the RPC servers of
    `key` registered on the tracker at `tracker` (HOST:PORT). A session waits at most
    `request_timeout_s` for a free server and the server ends it after `session_timeout_s`."""

    tracker: str | None = None
    key: str | None = None
    request_timeout_s: float = 60.0
    session_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if (self.tracker is None) != (self.key is None):
            raise TargetError(
                f"where to measure needs both an RPC tracker and a key, got tracker="
                f"{self.tracker!r} key={self.key!r}; pass both (e.g. Where.rpc('127.0.0.1:9190', "
                "'arm64')) or neither (Where.local())"
            )
        if self.tracker is not None and not re.fullmatch(r"[\w.-]+:\d+", self.tracker):
            raise TargetError(f"tracker {self.tracker!r} must look like HOST:PORT")
        if self.request_timeout_s <= 0 or self.session_timeout_s <= 0:
            raise TargetError("RPC timeouts must be positive seconds")

    @classmethod
    def local(cls) -> Where:
        return cls()

    @classmethod
    def rpc(
        cls,
        tracker: str,
        key: str,
        *,
        request_timeout_s: float = 60.0,
        session_timeout_s: float = 600.0,
    ) -> Where:
        return cls(tracker, key, request_timeout_s, session_timeout_s)

    @classmethod
    def of_target(cls, target: Any) -> Where:
        """The device of a `codesign.targets.Target`: its tracker and key when remote."""
        if getattr(target, "is_remote", False):
            return cls(target.tracker or "127.0.0.1:9190", target.rpc_key)
        return cls()

    @property
    def is_local(self) -> bool:
        return self.key is None

    def describe(self) -> str:
        return "local" if self.is_local else f"rpc key {self.key} via tracker {self.tracker}"

    def runner(
        self, *, seed: int = 0, config: Any = None, emulated: bool | None = None
    ) -> base.Runner:
        """A LocalRunner, or an RPCRunner (farm jobs; `config` a FarmConfig) for the key."""
        if self.is_local:
            from codesign.tvm_backend.runner.local import LocalRunner

            return LocalRunner(seed=seed)
        from codesign.tvm_backend.runner.rpc import RPCRunner

        assert self.tracker is not None and self.key is not None
        return RPCRunner(self.tracker, self.key, config=config, emulated=emulated, seed=seed)

    def farm(self, config: Any = None, emulated: bool | None = None) -> Any:
        """The codesign.farm.measure.FarmSpec of the key (measuring many modules at once)."""
        from codesign.farm.measure import FarmSpec

        self._need_rpc("a device farm")
        assert self.tracker is not None and self.key is not None
        return FarmSpec(self.tracker, self.key, config, emulated)

    def session(self, *, priority: int = 1) -> Any:
        """An RPC session on a free server of the key, with this value's deadlines (else
        codesign.errors.RemoteError)."""
        from codesign.artifact.remote import request_session

        self._need_rpc("an RPC session")
        assert self.tracker is not None and self.key is not None
        return request_session(
            self.tracker,
            self.key,
            timeout_s=self.request_timeout_s,
            session_timeout_s=self.session_timeout_s,
            priority=priority,
        )

    def _need_rpc(self, what: str) -> None:
        if self.is_local:
            raise TargetError(
                f"{what} needs an RPC tracker and key; this measures locally. Use "
                "Where.rpc(tracker, key) or a remote target (arm:key=...,tracker=...)"
            )
