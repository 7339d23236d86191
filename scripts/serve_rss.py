"""The resident memory of a loaded `localllm serve` (docs/deploy.md's sizing): start it, send one
400-token request, read VmRSS, stop it.

    python scripts/serve_rss.py [SERVE FLAGS ...]     # default: smollm2-135m --parallel 4 --ctx 4096
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request


def main(flags: list[str]) -> None:
    port = "7872"
    p = subprocess.Popen([sys.executable, "-m", "localllm", "serve", "smollm2-135m", "--port", port,
                          "--parallel", "4", "--ctx", "4096", *flags], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        end = time.time() + 120
        while True:
            try:
                if json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/health")).get("status") == "ok":
                    break
            except OSError:
                pass
            if time.time() > end or p.poll() is not None:
                raise SystemExit("the server did not come up")
            time.sleep(0.2)
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions",
                                     data=json.dumps({"prompt": "Hello " * 400, "max_tokens": 4}).encode(),
                                     headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req).read()
        rss = next(line for line in open(f"/proc/{p.pid}/status") if line.startswith("VmRSS"))
        print(f"serve {' '.join(flags)}: VmRSS {int(rss.split()[1]) / 1024:.0f} MiB")
    finally:
        p.send_signal(signal.SIGINT)
        p.wait(30)


if __name__ == "__main__":
    main(sys.argv[1:])
