"""TVM backend (`codesign.tvm_backend`): one module per role.

lower     PyTorch -> torch.export -> Relax
build     the compile recipe shared by LUT, networks and artifacts; library export
tuning    MetaSchedule task extraction, de-duplication and tuning
ms_runner how tuning times candidates: the fastest of several windows
database  MetaSchedule records stored in the LUT's SQLite file
runner    the runner package: times any compiled module where `Where` says (local or RPC)

Import the submodules directly; this package imports nothing heavy.
"""
