"""A real NVIDIA FLARE deployment on localhost: `nvflare poc prepare` provisions a server and
two sites (certificates for mutual TLS), the test starts each as a process of its own, writes
each site's own site config (its data path), exports the job with `fedtune nvflare export`,
submits it with the admin startup kit, waits, downloads and checks the result. It stops only
the processes it started, in `finally`, and the whole test is bounded in time.

The server listens on a free loopback port (the server is provisioned under the name
`localhost`, so FLARE binds 127.0.0.1 only); HOME and the POC workspace are temporary, so
nothing touches ~/.nvflare or another POC on this machine.
"""

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import write_jsonl

pytest.importorskip("nvflare")

from fedtune.core import arrays as A  # noqa: E402
from fedtune.engines.nvflare.job import kill_tree  # noqa: E402

HARD_LIMIT = 240  # seconds for the whole deployment (CI budget: it normally takes about a minute)

PROJECT = """\
api_version: 3
name: fedtune_poc
description: fedtune POC deployment test
participants:
  - name: localhost
    type: server
    org: fedtune
    fed_learn_port: {port}
  - name: admin@fedtune.test
    type: admin
    org: fedtune
    role: project_admin
  - name: site-1
    type: client
    org: fedtune
  - name: site-2
    type: client
    org: fedtune
builders:
  - path: nvflare.lighter.impl.workspace.WorkspaceBuilder
  - path: nvflare.lighter.impl.static_file.StaticFileBuilder
    args:
      config_folder: config
  - path: nvflare.lighter.impl.cert.CertBuilder
  - path: nvflare.lighter.impl.signature.SignatureBuilder
"""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_poc_deployment_two_sites_mutual_tls(tiny_llama, tmp_path):
    from fedtune.data import skills

    deadline = time.monotonic() + HARD_LIMIT
    bin_dir = str(Path(sys.executable).parent)
    env = dict(os.environ, HOME=str(tmp_path / "home"), NVFLARE_POC_WORKSPACE=str(tmp_path / "poc"),
               PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""))
    env.pop("FEDTUNE_SITE_CONFIG", None)  # each site must find its own config in its startup kit
    (tmp_path / "home").mkdir()

    def cli(*args, timeout=60):
        left = max(1.0, min(timeout, deadline - time.monotonic()))
        r = subprocess.run(list(args), capture_output=True, text=True, env=env, timeout=left, cwd=tmp_path)
        assert r.returncode == 0, f"{args}: {r.stdout[-2000:]}\n{r.stderr[-2000:]}"
        return r.stdout + r.stderr

    # --- provision: server + 2 sites + an admin, each with its certificate (mutual TLS)
    port = _free_port()
    (tmp_path / "project.yml").write_text(PROJECT.format(port=port))
    cli(str(Path(bin_dir) / "nvflare"), "poc", "prepare", "-i", str(tmp_path / "project.yml"), "--force")
    prod = tmp_path / "poc" / "fedtune_poc" / "prod_00"
    server, sites, admin = prod / "localhost", [prod / "site-1", prod / "site-2"], prod / "admin@fedtune.test"
    assert json.loads((server / "startup" / "fed_server.json").read_text())["servers"][0]["connection_security"] == "mtls"
    for kit in [server, *sites, admin]:
        assert (kit / "startup" / "rootCA.pem").is_file()

    # --- each site's own data and own site config (the job names no data)
    rows = [r.to_json() for r in skills.generate(8, 1)]
    for i, kit in enumerate(sites):
        data = write_jsonl(tmp_path / f"data_{kit.name}.jsonl", rows[i::2])
        (kit / "local" / "fedtune_site.toml").write_text(f'[sites."{kit.name}"]\ndata_path = {json.dumps(str(data))}\n')

    # --- the job, exported by fedtune's CLI
    config = tmp_path / "job.toml"
    config.write_text(f"""
[run]
name = "poc-test"
rounds = 2
[model]
name = {json.dumps(str(tiny_llama))}
autocast = "off"
[server]
min_clients = 2
[train]
max_steps = 2
batch_size = 4
micro_batch_size = 2
""")
    cli(sys.executable, "-m", "fedtune.cli", "nvflare", "export", str(config), "--out", str(tmp_path / "job"))

    started: list[subprocess.Popen] = []
    logs = {}
    try:
        # --- start the server, then the two sites: three processes of their own
        for kit in [server, *sites]:
            logs[kit.name] = open(tmp_path / f"{kit.name}.log", "w")
            started.append(subprocess.Popen(["bash", str(kit / "startup" / "sub_start.sh"), "--once"], env=env,
                                            stdout=logs[kit.name], stderr=subprocess.STDOUT, start_new_session=True))
            if kit is server:
                while not _listening(port):
                    assert time.monotonic() < deadline and started[0].poll() is None, "the server did not start"
                    time.sleep(0.2)

        # --- submit, wait, download
        kit = ["--startup-kit", str(admin)]
        out = cli(str(Path(bin_dir) / "nvflare"), "job", "submit", "-j", str(tmp_path / "job"), *kit)
        job_id = re.search(r"job_id:\s*(\S+)", out).group(1)
        out = cli(str(Path(bin_dir) / "nvflare"), "job", "wait", job_id, "--timeout", "150", *kit, timeout=170)
        assert "FINISHED:COMPLETED" in out, out
        cli(str(Path(bin_dir) / "nvflare"), "job", "download", job_id, "-o", str(tmp_path / "result"), *kit)
    finally:
        for p in started:  # only what this test started, with everything below it
            kill_tree(p.pid)
        for f in logs.values():
            f.close()
    assert all(p.poll() is not None for p in started)

    # --- the result: two rounds, both sites in each, the global adapter moved
    results = tmp_path / "result" / job_id / "workspace" / "fedtune"
    recs = [json.loads(x) for x in (results / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in recs] == [1, 2]
    for r in recs:
        assert sorted(c["id"] for c in r["clients"]) == ["site-1", "site-2"] and not r["dropped"]
        assert all(c["examples"] > 0 and np.isfinite(c["train_loss"]) for c in r["clients"])
    initial = A.unpack((tmp_path / "job" / "app" / "custom" / "fedtune_initial.safetensors").read_bytes())
    final = A.unpack((results / "global.safetensors").read_bytes())
    assert sorted(final) == sorted(initial)
    assert any(not np.array_equal(final[k], initial[k]) for k in initial)
    site_log = (tmp_path / "site-1.log").read_text()
    assert site_log.count("fedtune site site-1: data ") == 1  # launched once, kept across both rounds
