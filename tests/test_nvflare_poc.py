"""A real NVIDIA FLARE deployment on localhost: `nvflare poc prepare` provisions a server and
three sites (certificates for mutual TLS), the test starts each as a process of its own, writes
each site's own site config (its data path; site-3's path does not exist), exports a two-round
FedBPT job on a tiny model with `fedtune nvflare export`, submits it with the admin startup
kit, waits, downloads the result and collects it with `fedtune nvflare collect`. site-3 is
dropped each round with its name and path, and the run goes on with the two others
(server.min_clients = 2). The test stops only the processes it started, in `finally`, and
the whole test is bounded in time.

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

import nvflare  # noqa: E402,F401  (a pinned dependency: a broken install fails, never skips)

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
  - name: site-3
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


def _task_rows(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    pos, neg = ["the movie was great", "It was good", "good movie"], ["the movie was terrible", "It was bad", "bad news"]
    return [r for _ in range(n) for r in ({"sentence": str(rng.choice(pos)), "label": 1},
                                          {"sentence": str(rng.choice(neg)), "label": 0})]


def test_poc_deployment_fedbpt_mutual_tls(tiny_llama, tmp_path):
    deadline = time.monotonic() + HARD_LIMIT
    bin_dir = str(Path(sys.executable).parent)
    nvflare = str(Path(bin_dir) / "nvflare")
    env = dict(os.environ, HOME=str(tmp_path / "home"), NVFLARE_POC_WORKSPACE=str(tmp_path / "poc"),
               PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""))
    env.pop("FEDTUNE_SITE_CONFIG", None)  # each site must find its own config in its startup kit
    (tmp_path / "home").mkdir()

    def cli(*args, timeout=60):
        left = max(1.0, min(timeout, deadline - time.monotonic()))
        r = subprocess.run(list(args), capture_output=True, text=True, env=env, timeout=left, cwd=tmp_path)
        assert r.returncode == 0, f"{args}: {r.stdout[-2000:]}\n{r.stderr[-2000:]}"
        return r.stdout + r.stderr

    # --- each site's own data, named in its own site config; site-3's file is not there
    paths = {"site-1": write_jsonl(tmp_path / "site1.jsonl", _task_rows(4, 1)),
             "site-2": write_jsonl(tmp_path / "site2.jsonl", _task_rows(3, 2)),
             "site-3": tmp_path / "site3" / "missing.jsonl"}

    def provision():
        """server + 3 sites + an admin, each with its certificate (mutual TLS), on a port free now."""
        port = _free_port()
        (tmp_path / "project.yml").write_text(PROJECT.format(port=port))
        cli(nvflare, "poc", "prepare", "-i", str(tmp_path / "project.yml"), "--force")
        prod = tmp_path / "poc" / "fedtune_poc" / "prod_00"
        server, admin = prod / "localhost", prod / "admin@fedtune.test"
        sites = [prod / "site-1", prod / "site-2", prod / "site-3"]
        assert json.loads((server / "startup" / "fed_server.json").read_text())["servers"][0]["connection_security"] == "mtls"
        for kit in [server, *sites, admin]:
            assert (kit / "startup" / "rootCA.pem").is_file()
        for kit in sites:
            (kit / "local" / "fedtune_site.toml").write_text(
                f'[sites."{kit.name}"]\ndata_path = {json.dumps(str(paths[kit.name]))}\n')
        return port, server, admin, sites

    # --- the job: two rounds of FedBPT on the tiny model, exported by fedtune's CLI
    config = tmp_path / "job.toml"
    config.write_text(f"""
[run]
algorithm = "fedbpt"
name = "poc-test"
rounds = 2
[model]
name = {json.dumps(str(tiny_llama))}
autocast = "off"
[server]
min_clients = 2
round_retries = 0
[task]
name = "custom"
text_columns = ["sentence"]
template = "<P> . {{sentence}} . It was <mask> ."
verbalizer = {{"0" = "was", "1" = "the"}}
[fedbpt]
intrinsic_dim = 8
n_prompt_tokens = 4
popsize = 4
local_iter = 2
max_seq_len = 32
""")
    cli(sys.executable, "-m", "fedtune.cli", "nvflare", "export", str(config), "--out", str(tmp_path / "job"))

    started: list[subprocess.Popen] = []
    logs = {}
    try:
        # --- start the server; it is ours once the process we started listens on the port. The port was
        # free when provisioned; if another process took it meanwhile, our server exits: provision anew
        import psutil  # sub_start.sh --once execs FLARE's server: the process we started listens

        for attempt in range(3):
            port, server, admin, sites = provision()
            logs[f"server{attempt}"] = open(tmp_path / f"localhost{attempt}.log", "w")
            proc = subprocess.Popen(["bash", str(server / "startup" / "sub_start.sh"), "--once"], env=env,
                                    stdout=logs[f"server{attempt}"], stderr=subprocess.STDOUT, start_new_session=True)
            started.append(proc)
            bound = set()
            while proc.poll() is None and not bound:
                assert time.monotonic() < deadline, "the server did not start"
                try:
                    bound = {c.laddr.ip for c in psutil.Process(proc.pid).net_connections("tcp")
                             if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
                except psutil.NoSuchProcess:
                    break
                time.sleep(0.2)
            if bound:
                break
            kill_tree(proc.pid)  # it exited without listening: the port was taken
            started.remove(proc)
        assert bound == {"127.0.0.1"}, f"the server listens on {bound or 'nothing'}, not on loopback only"

        # --- then the three sites: processes of their own
        for kit in sites:
            logs[kit.name] = open(tmp_path / f"{kit.name}.log", "w")
            started.append(subprocess.Popen(["bash", str(kit / "startup" / "sub_start.sh"), "--once"], env=env,
                                            stdout=logs[kit.name], stderr=subprocess.STDOUT, start_new_session=True))

        # --- every site joined (a job runs with the sites connected when it starts), then submit, wait, download
        kit = ["--startup-kit", str(admin)]
        while not all(kit_.name in cli(nvflare, "system", "status", "client", *kit) for kit_ in sites):
            assert time.monotonic() < deadline and all(p.poll() is None for p in started), "the sites did not join"
            time.sleep(1)
        out = cli(nvflare, "job", "submit", "-j", str(tmp_path / "job"), *kit)
        job_id = re.search(r"job_id:\s*(\S+)", out).group(1)
        out = cli(nvflare, "job", "wait", job_id, "--timeout", "150", *kit, timeout=170)
        assert "FINISHED:COMPLETED" in out, out
        cli(nvflare, "job", "download", job_id, "-o", str(tmp_path / "result"), *kit)
    finally:
        for p in started:  # only what this test started, with everything below it
            kill_tree(p.pid)
        for f in logs.values():
            f.close()
    assert all(p.poll() is not None for p in started)

    # --- the result: two rounds from site-1 and site-2; site-3 dropped with its name and path
    results = tmp_path / "result" / job_id / "workspace" / "fedtune"
    recs = [json.loads(x) for x in (results / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in recs] == [1, 2]
    for r in recs:
        assert sorted(c["id"] for c in r["clients"]) == ["site-1", "site-2"]
        assert [c["examples"] for c in sorted(r["clients"], key=lambda c: c["id"])] == [8, 6]
        assert all(np.isfinite(c["train_loss"]) for c in r["clients"])
        (drop,) = r["dropped"]
        assert drop["id"] == "site-3" and f"site 'site-3': data path {paths['site-3']} does not exist" in drop["reason"]
    initial = A.unpack((tmp_path / "job" / "app" / "custom" / "fedtune_initial.safetensors").read_bytes())
    final = A.unpack((results / "global.safetensors").read_bytes())
    assert sorted(final) == sorted(initial) == ["mean", "sigma"]
    assert np.linalg.norm(final["mean"]) > 0 and final["sigma"][0] < initial["sigma"][0]  # moved and annealed
    assert (tmp_path / "site-1.log").read_text().count("fedtune site site-1: data ") == 1  # launched once
    # the job carried no data path; the sites named theirs
    job = json.loads((tmp_path / "job" / "app" / "custom" / "fedtune_job.json").read_text())
    assert job["config"]["task"]["train_path"] == "" and job["config"]["data"]["path"] == ""

    # --- collect: best-by-dev needs the dev rows, which the server never had: a clear error says what to set
    r = subprocess.run([sys.executable, "-m", "fedtune.cli", "nvflare", "collect", str(tmp_path / "result" / job_id),
                        "--out", str(tmp_path / "run0")], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "task.train_path=FILE" in r.stderr and "fedbpt.select_on_dev=false" in r.stderr
    # the final global prompt as a run folder, usable by `fedtune classify`
    cli(sys.executable, "-m", "fedtune.cli", "nvflare", "collect", str(tmp_path / "result" / job_id),
        "--out", str(tmp_path / "run"), "--set", "fedbpt.select_on_dev=false")
    from fedtune.fedbpt.prompt import load_prompt

    z, _, meta = load_prompt(tmp_path / "run" / "prompt")
    np.testing.assert_array_equal(z, final["mean"].astype(np.float32))
    assert meta["round"] == 2 and json.loads((tmp_path / "run" / "summary.json").read_text())["dropped"] == 2
