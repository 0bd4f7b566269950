"""The RPC device farm (`codesign.farm`): TVM trackers and servers that stay up, and measuring
on them that cannot hang. Import the submodules directly; this package imports nothing heavy.

config        farm.toml -> FarmConfig (addresses, server groups, every timeout and retry limit)
tracker       a bounded client of the TVM tracker protocol (summary, check_key, request)
procs         processes by (PID, start time), whole-tree kills, state/event files
supervisor    owns the tracker and servers; health by tracker registration; restarts
rpc_server    TVM's RPC server with a configurable tracker-reconnect window
worker        the child process that runs one measurement job at a time
scheduler     jobs over the servers of their keys: deadlines, retries, quarantine
measure       FarmSpec and the measure phase of LUT building on a farm
tuning        MetaSchedule's RPC runner with guards (key check, deadlines, watchdog)
arm_emulator  an arm64 Debian chroot under qemu-user with a TVM RPC server in it
"""
