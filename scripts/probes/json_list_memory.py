"""Peak memory of reading a JSON list annotation file (session 13, `data adapt`; docs/decisions.md).

    python scripts/probes/json_list_memory.py list 400000     # a list of N small samples: our reader vs json.loads
    python scripts/probes/json_list_memory.py nesting 30000   # a list nested N deep: our reader vs ijson (if installed)

Each reader runs in its own child process, which prints its own peak RSS (VmHWM, reset by exec) and wall time.
"""
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import io, json, sys, time
path, how = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
try:
    if how == "ours":
        from duetgen.data.alignment.adapters import _rows_json_list
        from pathlib import Path
        n = sum(1 for _ in _rows_json_list(Path(path)))
    elif how == "json.loads":
        n = len(json.loads(open(path, encoding="utf-8").read()))
    else:
        import ijson
        with open(path, "rb") as f:
            n = sum(1 for _ in ijson.items(f, "item"))
    result = f"{n} items"
except Exception as e:  # the readers' own refusals (ours: nested too deeply) are results here
    result = f"{type(e).__name__}: {str(e)[:80]}"
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]
print(f"{how:>10}: {int(hwm) / 1024:7.1f} MB peak, {time.perf_counter() - t0:5.2f} s, {result}")
"""


def run(path: Path, how: str) -> None:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path), how], capture_output=True, text=True)
    print(proc.stdout.strip() or f"{how:>10}: died (rc {proc.returncode}) {proc.stderr.strip()[-200:]}")


def main() -> None:
    kind, n = sys.argv[1], int(sys.argv[2])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.json"
        if kind == "list":
            sample = {"image": "x.png", "conversations": [{"from": "human", "value": "hello there " * 3}]}
            path.write_text("[" + ",".join(json.dumps({**sample, "id": i}) for i in range(n)) + "]")
            readers = ("ours", "json.loads")
        else:
            path.write_text("[" * n + "]" * n)
            readers = ("ours", "ijson")
        print(f"{kind} {n}: {path.stat().st_size / 1e6:.1f} MB")
        for how in readers:
            run(path, how)


if __name__ == "__main__":
    main()
