"""What the benchmark drivers share (`from bench_child import child`; bench/ is on sys.path
when a script runs as `python bench/X.py`): running one side in a child process."""
import json
import subprocess
import sys


def child(cmd, env):
    """Runs `cmd` with `env`; exits naming the command on failure, else returns the JSON object
    its last line of output holds."""
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"command failed: {' '.join(map(str, cmd))}\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
