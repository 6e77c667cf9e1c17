"""deploy/ and dashboards/: every manifest validates against its schema, every dashboard query names
metrics the code exports, and every command, option, module, port and reference the manifests name exists.

No network, no model. Kubernetes objects are checked against kubernetes-validate's bundled schemas;
KubeRay, Compose, Prometheus and Grafana files against the reduced schemas in deploy/schemas/.
Exported metric names and labels are read from the /metrics text of the real metric classes
(serving.metrics.ServingMetrics; the coordinator's JobMetrics over a real embedded Redis), vLLM's
from the metric definitions in its installed source. `kvedit` command lines are parsed by the typer
app's own parser (cluster.cli.app), so a renamed command, option or metric fails here.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import importlib.util
import json
import re
import shlex
import tomllib
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY, DASHBOARDS = ROOT / "deploy", ROOT / "dashboards"
COMPOSE = DEPLOY / "docker-compose.yml"
PROMETHEUS = DASHBOARDS / "prometheus.yml"
DOCKERFILES = sorted(p for p in DEPLOY.glob("Dockerfile.*") if p.suffix != ".dockerignore")
K8S_FILES = sorted((DEPLOY / "k8s").rglob("*.yaml"))
DASHBOARD_FILES = sorted((DASHBOARDS / "grafana").glob("*.json"))
PROVISIONING_FILES = sorted((DASHBOARDS / "provisioning").rglob("*.yml"))
DATA_FILES = sorted(p for d in (DEPLOY, DASHBOARDS) for p in d.rglob("*") if p.suffix in (".json", ".yml", ".yaml"))
SERVING_DASHBOARD = "kvedit-serving"  # the only dashboard that may query vLLM's own `vllm:` metrics
DASHBOARD_METRICS = {SERVING_DASHBOARD: "serving", "kvedit-jobs": "jobs"}  # dashboard uid -> exporter


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def yaml_docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def k8s_docs() -> list[tuple[str, dict]]:
    return [(rel(p), d) for p in K8S_FILES for d in yaml_docs(p)]


def compose() -> dict:
    return yaml_docs(COMPOSE)[0]


def schema_errors(schema_file: str, doc, where: str) -> list[str]:
    from jsonschema import Draft202012Validator

    schema = json.loads((DEPLOY / "schemas" / schema_file).read_text())
    Draft202012Validator.check_schema(schema)
    return [f"{where}: {'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in Draft202012Validator(schema).iter_errors(doc)]


def is_kvedit_image(image) -> bool:
    return isinstance(image, str) and image.split(":")[0].rsplit("/", 1)[-1] == "kvedit"


# ------------------------------------------------------------------------------------ parsing, schemas


def test_deploy_has_every_piece():
    kinds = {d.get("kind") for _, d in k8s_docs()}
    assert {"RayCluster", "RayJob", "Deployment", "Service", "ConfigMap"} <= kinds, kinds
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.cpu", "Dockerfile.gpu"]
    assert {"coordinator", "replica", "redis", "prometheus", "grafana"} <= set(compose()["services"])
    assert {json.loads(p.read_text())["uid"] for p in DASHBOARD_FILES} == set(DASHBOARD_METRICS)
    assert (DEPLOY / "README.md").is_file()


@pytest.mark.parametrize("path", DATA_FILES, ids=rel)
def test_every_file_parses(path):
    docs = [json.loads(path.read_text())] if path.suffix == ".json" else yaml_docs(path)
    assert docs and all(isinstance(d, dict) for d in docs), f"{rel(path)}: expected one or more mappings"


def test_compose_and_prometheus_match_their_schemas():
    errors = schema_errors("compose.schema.json", compose(), rel(COMPOSE))
    errors += schema_errors("prometheus-config.schema.json", yaml_docs(PROMETHEUS)[0], rel(PROMETHEUS))
    assert not errors, "\n".join(errors)


def test_grafana_files_match_their_schemas():
    errors = []
    for p in DASHBOARD_FILES:
        board = json.loads(p.read_text())
        errors += schema_errors("grafana-dashboard.schema.json", board, rel(p))
        ids = [panel["id"] for panel in board["panels"]]
        if len(ids) != len(set(ids)):
            errors.append(f"{rel(p)}: duplicate panel ids {sorted(ids)}")
        for panel in board["panels"]:
            if panel["gridPos"]["x"] + panel["gridPos"]["w"] > 24:
                errors.append(f"{rel(p)}: panel {panel['title']!r} runs past the 24-column grid")
    for p in PROVISIONING_FILES:
        errors += schema_errors("grafana-provisioning.schema.json", yaml_docs(p)[0], rel(p))
    assert not errors, "\n".join(errors)


def ray_groups(doc: dict) -> list[tuple[str, dict]]:
    """(role, group spec) of the head and worker groups of a RayCluster, or of a RayJob's own cluster."""
    cluster = {"RayCluster": doc.get("spec"), "RayJob": doc.get("spec", {}).get("rayClusterSpec")}.get(doc.get("kind"))
    if not cluster:
        return []
    return [("head", cluster["headGroupSpec"])] + [(f"worker group {g['groupName']}", g)
                                                    for g in cluster.get("workerGroupSpecs", [])]


def pod_templates(doc: dict) -> list[tuple[str, dict, dict]]:
    """(role, pod template, labels its pods carry) of a Deployment, RayCluster or RayJob (KubeRay adds ray.io/ labels)."""
    if doc["kind"] == "Deployment":
        t = doc["spec"]["template"]
        return [("pod", t, dict(t["metadata"].get("labels", {})))]
    # a RayJob's cluster gets a generated name, so only a RayCluster's pods carry a known ray.io/cluster
    cluster = {"ray.io/cluster": doc["metadata"]["name"]} if doc["kind"] == "RayCluster" else {}
    return [(role, g["template"], {**g["template"].get("metadata", {}).get("labels", {}), **cluster,
                                   "ray.io/node-type": "head" if role == "head" else "worker"})
            for role, g in ray_groups(doc)]


def test_kubernetes_objects_validate():
    """Core objects against the Kubernetes schemas; KubeRay objects against deploy/schemas, their pod templates
    as Kubernetes PodTemplateSpecs (strict: unknown fields fail)."""
    import kubernetes_validate

    version = kubernetes_validate.latest_version()
    errors = []
    for where, doc in k8s_docs():
        label = f"{where}: {doc.get('kind')} {doc.get('metadata', {}).get('name')}"
        if str(doc.get("apiVersion", "")).startswith("ray.io/"):
            errors += schema_errors("kuberay-v1.schema.json", doc, label)
            checks = [({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": t},
                       f"{label} {role}") for role, t, _ in pod_templates(doc)]
        else:
            checks = [(doc, label)]
        for obj, what in checks:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                errors.append(f"{what}: {'/'.join(map(str, exc.path))}: {exc.message}")
    assert not errors, "\n".join(errors)


def test_ray_start_params_are_ray_start_options():
    import warnings

    with warnings.catch_warnings():  # importing Ray's CLI imports Ray Serve, which warns about pydantic
        warnings.simplefilter("ignore")
        from ray.scripts.scripts import start

    options = {o for p in start.params for o in p.opts}
    bad = [f"{where}: {doc['metadata']['name']} {role}: `ray start` has no --{key}"
           for where, doc in k8s_docs() for role, group in ray_groups(doc) for key in group.get("rayStartParams", {})
           if f"--{key}" not in options]
    assert not bad, "\n".join(bad)


# ------------------------------------------------------------------------------------ metrics


def metric_index(exposition: str) -> dict[str, dict]:
    """Sample name -> {"type": family type, "labels": {label: values seen}} of a /metrics text."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, dict] = {}
    for fam in text_string_to_metric_families(exposition):
        for s in fam.samples:
            entry = out.setdefault(s.name, {"type": fam.type, "labels": {}})
            for k, v in s.labels.items():
                entry["labels"].setdefault(k, set()).add(v)
    return out


@pytest.fixture(scope="module")
def serving_metrics() -> dict[str, dict]:
    """What a replica's /metrics shows after one request and one memory status (both backends share these)."""
    from prometheus_client import CollectorRegistry, generate_latest

    from serving.metrics import ServingMetrics

    registry = CollectorRegistry()
    m = ServingMetrics(registry)
    m.observe_request("/v1/completions", 200, 0.2, {"prompt_tokens": 7, "completion_tokens": 4})
    m.observe_memory({"memory": "facts", "version": 3, "facts": 12, "errors": 0, "hits": 2, "tokens": 9,
                      "reload_seconds": [0.04]})
    return metric_index(generate_latest(registry).decode())


@pytest.fixture(scope="module")
def jobs_metrics(tmp_path_factory) -> dict[str, dict]:
    """The coordinator API's GET /metrics over a real embedded Redis, after what a job records."""
    from fastapi.testclient import TestClient

    from cluster.api import JobMetrics, create_app
    from cluster.jobs import JobStore
    from cluster.queue import JobQueue
    from store import connect_redis, embedded_url, stop_embedded_redis

    root = str(tmp_path_factory.mktemp("deploy-store"))
    connect_redis(None, root).close()
    try:
        jobs = JobStore.connect(embedded_url(root), root)
        metrics = JobMetrics()
        metrics.edits_committed.inc(3)
        metrics.edits_failed.inc()
        metrics.batch_seconds.observe(4.2)
        metrics.optimiser_loss.observe(0.3)
        metrics.actor_restarts.labels(pool="values").inc()
        response = TestClient(create_app(jobs, JobQueue(jobs.client), metrics, token="t")).get("/metrics")
        assert response.status_code == 200
        jobs.client.close()
        return metric_index(response.text)
    finally:
        stop_embedded_redis(root)


@lru_cache(maxsize=1)
def vllm_metrics() -> dict[str, dict]:
    """vLLM's engine metrics as exposed (counter X -> X_total, histogram X -> X_bucket/_sum/_count), read from
    the metric definitions in the installed vLLM's v1/metrics/loggers.py."""
    spec = importlib.util.find_spec("vllm")
    assert spec is not None, "vllm is not installed: the serving dashboard's vllm: panels cannot be checked"
    tree = ast.parse((Path(spec.submodule_search_locations[0]) / "v1" / "metrics" / "loggers.py").read_text())
    base = next((n.value for n in ast.walk(tree) if isinstance(n, ast.Assign) and isinstance(n.value, ast.List)
                 and any(isinstance(t, ast.Name) and t.id == "labelnames" for t in n.targets)), ast.List(elts=[]))

    def labels(node) -> set[str]:
        if isinstance(node, ast.Name) and node.id == "labelnames":
            node = base
        if isinstance(node, ast.BinOp):
            return labels(node.left) | labels(node.right)
        return {e.value for e in getattr(node, "elts", []) if isinstance(e, ast.Constant)}

    kinds = {"_gauge_cls": "gauge", "_counter_cls": "counter", "_histogram_cls": "histogram"}
    out: dict[str, dict] = {}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in kinds):
            continue
        kw = {k.arg: k.value for k in node.keywords}
        if not isinstance(kw.get("name"), ast.Constant):
            continue
        name, kind, names = kw["name"].value, kinds[node.func.attr], labels(kw.get("labelnames"))
        suffixes = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"]}[kind]
        for suffix in suffixes:
            sample_labels = names | ({"le"} if suffix == "_bucket" else set())
            out[name + suffix] = {"type": kind, "labels": {n: set() for n in sample_labels}}
    return out


def prometheus_config() -> dict:
    return yaml_docs(PROMETHEUS)[0]


def scrape_jobs() -> set[str]:
    return {c["job_name"] for c in prometheus_config()["scrape_configs"]}


def scrape_labels() -> set[str]:
    """Labels Prometheus adds to every scraped series: instance, job and the static target labels."""
    extra = {k for c in prometheus_config()["scrape_configs"] for s in c.get("static_configs", [])
             for k in s.get("labels", {})}
    return {"instance", "job"} | extra


def parse_promql(expr: str):
    import promql_parser

    for var, value in (("$__rate_interval", "5m"), ("$__interval", "1m"), ("$__range", "1h")):
        expr = expr.replace(var, value)
    return promql_parser.parse(re.sub(r"\$\{?\w+\}?", "grafana_variable", expr))


def selectors(node) -> list:
    import promql_parser as pp

    found: list = []
    pp.walk(node, lambda n: found.append(n) if isinstance(n, pp.VectorSelector) else None)
    return found


def nearest(name: str, known) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.6)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def query_problems(expr: str, known: dict[str, dict], label_values: dict[str, set]) -> list[str]:
    """What is wrong with one PromQL query against the exported metrics `known`."""
    import promql_parser as pp

    try:
        tree = parse_promql(expr)
    except Exception as exc:  # noqa: BLE001 - the parser's own message is the report
        return [f"does not parse: {exc}"]
    problems: list[str] = []
    always = scrape_labels()

    def labels_of(name: str) -> set[str]:
        return set(known[name]["labels"]) if name in known else set()

    for vs in selectors(tree):
        if vs.name != "up" and vs.name not in known:
            problems.append(f"metric {vs.name} is not exported{nearest(vs.name, known)}")
            continue
        for m in vs.matchers.matchers:
            if m.name not in always and m.name not in labels_of(vs.name):
                problems.append(f"{vs.name} has no label {m.name!r} (labels: {sorted(labels_of(vs.name) | always)})")
            elif m.op == pp.MatchOp.Equal and m.name in label_values and m.value not in label_values[m.name]:
                problems.append(f"{vs.name}{{{m.name}={m.value!r}}}: no such value (known: {sorted(label_values[m.name])})")

    def visit(n):
        if isinstance(n, pp.AggregateExpr) and n.modifier is not None and n.modifier.type == pp.AggModifierType.By:
            allowed = set(always).union(*(labels_of(vs.name) for vs in selectors(n.expr)))
            missing = [label for label in n.modifier.labels if label not in allowed]
            if missing:
                problems.append(f"{n.op} by ({', '.join(n.modifier.labels)}): no series below has {missing}")
        if isinstance(n, pp.Call) and n.func.name in ("rate", "irate", "increase"):
            name = n.args[0].vector_selector.name
            if name in known and known[name]["type"] not in ("counter", "histogram"):
                problems.append(f"{n.func.name}({name}): {name} is a {known[name]['type']}, not a counter")
        if isinstance(n, pp.Call) and n.func.name == "histogram_quantile":
            names = [vs.name for vs in selectors(n.args[1])]
            if not names or any(not x.endswith("_bucket") or known.get(x, {}).get("type") != "histogram" for x in names):
                problems.append(f"histogram_quantile over {names}: expects histogram _bucket series")

    pp.walk(tree, visit)
    return problems


def dashboard_queries(board: dict) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and every query variable of a dashboard."""
    out = [(f"panel {p['title']!r} target {t['refId']}", t["expr"]) for p in board["panels"] for t in p.get("targets", [])]
    for var in board["templating"]["list"]:
        if var["type"] != "query":
            continue
        m = re.fullmatch(r"\s*label_values\(\s*(.+?)\s*,\s*(\w+)\s*\)\s*", var["definition"])
        assert m, f"variable {var['name']}: only label_values(SELECTOR, LABEL) queries are checked: {var['definition']!r}"
        # `count by (LABEL) (SELECTOR)` names the same metric and label, in a form the query checker reads
        out.append((f"variable ${var['name']}", f"count by ({m.group(2)}) ({m.group(1)})"))
    return out


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.name)
def test_dashboard_queries_name_exported_metrics(path, request):
    from cluster.jobs import JobState

    board = json.loads(path.read_text())
    assert board["uid"] in DASHBOARD_METRICS, f"{rel(path)}: unknown uid {board['uid']!r}: map it in DASHBOARD_METRICS"
    known = dict(request.getfixturevalue(f"{DASHBOARD_METRICS[board['uid']]}_metrics"))
    if board["uid"] == SERVING_DASHBOARD:
        known.update(vllm_metrics())
    values = {"job": scrape_jobs(), "state": set(JobState.ALL)}
    queries = dashboard_queries(board)
    assert len(queries) >= 10
    problems = [f"{rel(path)}: {where}: {p}\n    {expr}"
                for where, expr in queries for p in query_problems(expr, known, values)]
    assert not problems, "\n".join(problems)


def test_only_the_serving_dashboard_queries_vllm():
    for p in DASHBOARD_FILES:
        board = json.loads(p.read_text())
        names = {vs.name for _, expr in dashboard_queries(board) for vs in selectors(parse_promql(expr))}
        vllm = {n for n in names if n.startswith("vllm:")}
        assert bool(vllm) == (board["uid"] == SERVING_DASHBOARD), f"{rel(p)} queries {sorted(vllm)}"


def test_query_checker_catches_mistakes(serving_metrics):
    """The checks above can fail: a renamed metric, a missing label, rate() of a gauge, a quantile without buckets."""
    values = {"job": {"kvedit-serving"}}
    assert query_problems("kvedit_requests_total", serving_metrics, values) == []
    assert "not exported" in query_problems("rate(kvedit_request_total[5m])", serving_metrics, values)[0]
    assert "no label 'model'" in query_problems('kvedit_memory_facts{model="x"}', serving_metrics, values)[0]
    assert "not a counter" in query_problems("rate(kvedit_memory_version[5m])", serving_metrics, values)[0]
    assert "histogram" in query_problems("histogram_quantile(0.9, kvedit_memory_facts)", serving_metrics, values)[0]
    assert "no such value" in query_problems('up{job="serving"}', serving_metrics, values)[0]
    assert "no series below" in query_problems("sum by (pool) (kvedit_memory_facts)", serving_metrics, values)[0]


# ------------------------------------------------------------------------------------ commands


@lru_cache(maxsize=1)
def kvedit_cli():
    import typer.main

    from cluster.cli import app

    return typer.main.get_command(app)


class CommandError(Exception):
    """A command line that would not run: unknown sub-command or option, bad or missing value."""


def parse_kvedit(argv: list[str]):
    """(command path, parsed params) of a `kvedit ...` command line, parsed by the typer app; CommandError if wrong."""
    import typer

    cmd, path, words = kvedit_cli(), ["kvedit"], list(argv[1:])
    while hasattr(cmd, "commands"):
        if not words or words[0].startswith("-"):
            raise CommandError(f"`{' '.join(argv)}`: `{' '.join(path)}` needs a sub-command")
        sub = cmd.commands.get(words[0])
        if sub is None:
            raise CommandError(f"`{' '.join(argv)}`: `{' '.join(path)}` has no sub-command {words[0]!r}"
                               f" (has: {', '.join(sorted(cmd.commands))})")
        cmd, path = sub, path + [words.pop(0)]
    try:
        ctx = cmd.make_context(" ".join(path), words)
    except typer.TyperException as exc:
        raise CommandError(f"`{' '.join(argv)}`: {exc.format_message()}") from None
    return " ".join(path), ctx.params


def shell_commands(script: str) -> list[list[str]]:
    """The simple commands of a shell script (split at ; && || |), each as words; env assignments dropped."""
    lex = shlex.shlex(script, posix=True, punctuation_chars=";&|")
    lex.whitespace_split = True
    cmds, cur = [], []
    for word in lex:
        if word and set(word) <= set(";&|"):
            cmds.append(cur)
            cur = []
        elif cur or not re.fullmatch(r"[A-Za-z_]\w*=.*", word):  # leading NAME=value assignments are not the command
            cur.append(word)
    return [c for c in cmds + [cur] if c]


def unwrap(argv: list[str]) -> list[str]:
    while argv and Path(argv[0]).name in ("tini", "exec", "env"):
        argv = argv[1:]
        if argv and argv[0] == "--":
            argv = argv[1:]
    return argv


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) pairs; continuation lines joined, comment lines dropped (as Docker does)."""
    out, cur = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            cur += line[:-1] + " "
            continue
        instr, _, rest = (cur + line).partition(" ")
        out.append((instr.upper(), rest.strip()))
        cur = ""
    return out


def exec_or_shell(value) -> list[list[str]]:
    if isinstance(value, list):
        return [[str(v) for v in value]]
    value = str(value).strip()
    if value.startswith("["):
        return [json.loads(value)]
    return shell_commands(value)


def command_sites() -> list[tuple[str, list[str], bool]]:
    """(where, argv, runs in a kvedit image) of every command the Dockerfiles, compose file, Kubernetes
    manifests and deploy/README.md name."""
    sites: list[tuple[str, list[str], bool]] = []
    for p in DOCKERFILES:
        entry: list[str] = []
        for instr, rest in dockerfile_instructions(p):
            if instr == "RUN":
                sites += [(f"{rel(p)} RUN", argv, True) for argv in exec_or_shell(rest)]
            elif instr == "ENTRYPOINT":
                entry = exec_or_shell(rest)[0]
            elif instr == "CMD":
                sites.append((f"{rel(p)} CMD", entry + exec_or_shell(rest)[0], True))
    for name, svc in compose()["services"].items():
        mine = is_kvedit_image(svc.get("image"))
        for key in ("entrypoint", "command"):
            if svc.get(key):
                sites += [(f"{rel(COMPOSE)} {name}.{key}", argv, mine) for argv in exec_or_shell(svc[key])]
        test = svc.get("healthcheck", {}).get("test")
        if isinstance(test, list) and test[0] in ("CMD", "CMD-SHELL"):
            argvs = [test[1:]] if test[0] == "CMD" else shell_commands(test[1])
            sites += [(f"{rel(COMPOSE)} {name}.healthcheck", argv, mine) for argv in argvs]
    for where, doc in k8s_docs():
        if doc["kind"] == "RayJob":
            sites += [(f"{where} entrypoint", argv, True) for argv in shell_commands(doc["spec"]["entrypoint"])]
        for role, t, _ in pod_templates(doc):
            for c in t["spec"]["containers"]:
                argv = list(c.get("command", [])) + list(c.get("args", []))
                if argv:
                    sites.append((f"{where} {role} {c['name']}", argv, is_kvedit_image(c.get("image"))))
    readme = (DEPLOY / "README.md").read_text()
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", readme, re.S):
        script = re.sub(r"\\\n", " ", block)
        sites += [("deploy/README.md", argv, True) for line in script.splitlines()
                  if line.strip() and not line.lstrip().startswith("#") for argv in shell_commands(line)]
    return sites


def kvedit_argv(argv: list[str]) -> list[str] | None:
    """The `kvedit ...` part of a command: itself, or run through `docker compose exec|run SERVICE` or
    `kubectl exec TARGET --`; None for any other command."""
    argv = unwrap(argv)
    if argv[:3] in (["docker", "compose", "exec"], ["docker", "compose", "run"]):
        rest = argv[3:]
        while rest and rest[0].startswith("-"):
            rest = rest[1:]
        argv = rest[1:]
    elif argv[:2] == ["kubectl", "exec"]:
        argv = argv[argv.index("--") + 1:] if "--" in argv else argv[3:]
    return argv if argv and Path(argv[0]).name == "kvedit" else None


def test_every_kvedit_command_and_option_exists():
    sites = command_sites()
    checked, problems = [], []
    for where, argv, _ in sites:
        k = kvedit_argv(argv)
        if k is None:
            continue
        try:
            checked.append(parse_kvedit(k)[0])
        except CommandError as exc:
            problems.append(f"{where}: {exc}")
    assert not problems, "\n".join(problems)
    assert {"kvedit serve", "kvedit coordinator", "kvedit model prepare", "kvedit edit submit"} <= set(checked), checked


def test_cli_check_catches_mistakes():
    with pytest.raises(CommandError, match="No such option: --prot"):
        parse_kvedit(["kvedit", "serve", "--prot", "8000"])
    with pytest.raises(CommandError, match="has no sub-command 'serv'"):
        parse_kvedit(["kvedit", "serv"])
    with pytest.raises(CommandError, match="--optimisers"):
        parse_kvedit(["kvedit", "coordinator", "--optimisers", "0"])
    with pytest.raises(CommandError, match="Missing option '--memory'"):
        parse_kvedit(["kvedit", "edit", "submit", "counterfact_valid.json"])


def console_scripts() -> set[str]:
    return {ep.name for ep in importlib.metadata.entry_points(group="console_scripts")}


def test_modules_and_console_scripts_exist():
    """`python -m M` modules import, `python -c` code compiles, and commands of kvedit images are installed scripts."""
    problems = []
    scripts = console_scripts()
    for where, argv, mine in command_sites():
        argv = unwrap(argv)
        if not mine or not argv:
            continue
        first = Path(argv[0]).name
        if first in ("python", "python3"):
            if "-m" in argv:
                module = argv[argv.index("-m") + 1]
                if importlib.util.find_spec(module) is None:
                    problems.append(f"{where}: no module {module}")
            if "-c" in argv:
                try:
                    compile(argv[argv.index("-c") + 1], where, "exec")
                except SyntaxError as exc:
                    problems.append(f"{where}: python -c does not compile: {exc}")
        elif "RUN" not in where and where != "deploy/README.md" and first not in scripts:
            problems.append(f"{where}: {first!r} is not a console script of any installed package")
    assert not problems, "\n".join(problems)


def test_package_entry_points_resolve():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    targets = dict(project["scripts"])
    targets.update({f"vllm plugin {k}": v for k, v in project["entry-points"]["vllm.general_plugins"].items()})
    assert "kvedit" in targets
    for name, target in targets.items():
        module, _, attr = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), f"{name} = {target} is not callable"


def test_dockerfiles_copy_every_package_and_install_known_extras():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = set(pyproject["project"]["optional-dependencies"])
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    for p in DOCKERFILES:
        copied, problems = set(), []
        ignore = [line.strip() for line in Path(f"{p}.dockerignore").read_text().splitlines()]
        for instr, rest in dockerfile_instructions(p):
            if instr == "COPY" and not rest.startswith("--from"):
                for src in shlex.split(rest)[:-1]:
                    copied.add(src.rstrip("/"))
                    if not (ROOT / src).exists():
                        problems.append(f"COPY {src}: not in the repository")
                    if f"!{src.rstrip('/')}" not in [i.rstrip("/") for i in ignore]:
                        problems.append(f"COPY {src}: excluded by {p.name}.dockerignore")
            if instr == "RUN":
                for group in re.findall(r"\.\[([\w,-]+)\]", rest):
                    problems += [f"pip extra [{e}] is not in pyproject.toml" for e in group.split(",") if e not in extras]
        problems += [f"package {pkg}/ is not copied into the image" for pkg in sorted(packages - copied)]
        assert not problems, f"{rel(p)}:\n" + "\n".join(problems)


# ------------------------------------------------------------------------------------ ports and references


def compose_listen_ports(svc: dict) -> set[int]:
    ports = {int(str(p).split("/")[0].split(":")[-1]) for p in svc.get("ports", []) + svc.get("expose", [])}
    return ports


def kvedit_http(argv: list[str]) -> tuple[str, str, int] | None:
    """(command, host, port) of a kvedit command that listens on HTTP, else None."""
    command, params = parse_kvedit(argv)
    if command == "kvedit serve":
        return command, params["host"], params["port"]
    if command == "kvedit coordinator" and params["http_port"] is not None:
        return command, params["http_host"], params["http_port"]
    return None


def test_prometheus_scrapes_the_ports_compose_exposes():
    services = compose()["services"]
    listening = {}
    for name, svc in services.items():
        k = kvedit_argv(exec_or_shell(svc["command"])[0]) if svc.get("command") else None
        http = kvedit_http(k) if k else None
        if http:
            assert http[1] == "0.0.0.0", f"compose {name}: `{http[0]}` listens on {http[1]}, unreachable from Prometheus"
            assert http[2] in compose_listen_ports(svc), \
                f"compose {name}: listens on {http[2]}, publishes {svc.get('ports')}"
            listening[name] = http[2]
    assert set(listening) == {"coordinator", "replica"}, listening
    scraped = {}
    for job in prometheus_config()["scrape_configs"]:
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, _, port = target.rpartition(":")
                assert host in services, f"{rel(PROMETHEUS)} job {job['job_name']}: {host} is no compose service"
                assert int(port) in compose_listen_ports(services[host]), (
                    f"{rel(PROMETHEUS)} job {job['job_name']}: {target}, "
                    f"but {host} exposes {sorted(compose_listen_ports(services[host]))}")
                scraped[host] = int(port)
    for name, port in listening.items():
        assert scraped.get(name) == port, f"compose {name} serves /metrics on {port}; Prometheus scrapes {scraped.get(name)}"


def test_compose_mounts_the_dashboards_and_checks_health():
    services = compose()["services"]

    def mounts(svc) -> dict[str, Path]:
        out = {}
        for v in svc.get("volumes", []):
            src, _, dst = v.partition(":")
            if src.startswith("."):
                out[dst.split(":")[0]] = (DEPLOY / src).resolve()
        return out

    grafana, prom = mounts(services["grafana"]), mounts(services["prometheus"])
    assert prom["/etc/prometheus/prometheus.yml"] == PROMETHEUS
    assert grafana["/etc/grafana/provisioning"] == DASHBOARDS / "provisioning"
    providers = [p for f in PROVISIONING_FILES for p in yaml_docs(f)[0].get("providers", [])]
    assert [grafana.get(p["options"]["path"]) for p in providers] == [DASHBOARDS / "grafana"]
    sources = [d for f in PROVISIONING_FILES for d in yaml_docs(f)[0].get("datasources", [])]
    host, _, port = sources[0]["url"].split("//")[1].partition(":")
    assert host == "prometheus" and int(port) in compose_listen_ports(services["prometheus"])
    replica = services["replica"]
    port = kvedit_http(kvedit_argv(replica["command"]))[2]
    assert f"http://127.0.0.1:{port}/health" in " ".join(replica["healthcheck"]["test"])
    assert services["coordinator"]["environment"]["KVEDIT_REDIS_URL"].startswith("redis://redis:6379")


def test_kubernetes_objects_reference_each_other():
    docs = k8s_docs()
    names = {(d["kind"], d["metadata"]["name"]) for _, d in docs}
    pods = [(f"{w}: {d['kind']} {d['metadata']['name']} {role}", t, labels)
            for w, d in docs for role, t, labels in pod_templates(d)]
    problems = []
    for where, t, labels in pods:
        spec = t["spec"]
        for vol in spec.get("volumes", []):
            claim = vol.get("persistentVolumeClaim", {}).get("claimName")
            if claim and ("PersistentVolumeClaim", claim) not in names:
                problems.append(f"{where}: volume {vol['name']}: no PersistentVolumeClaim {claim}")
        for c in spec["containers"]:
            ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
            for ref in c.get("envFrom", []):
                if "configMapRef" in ref and ("ConfigMap", ref["configMapRef"]["name"]) not in names:
                    problems.append(f"{where}: no ConfigMap {ref['configMapRef']['name']}")
            for env in c.get("env", []):
                secret = env.get("valueFrom", {}).get("secretKeyRef")
                if secret and not secret.get("optional") and ("Secret", secret["name"]) not in names:
                    problems.append(f"{where}: env {env['name']} needs Secret {secret['name']}, which no manifest creates")
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                port = c.get(probe, {}).get("httpGet", {}).get("port")
                if isinstance(port, str) and port not in ports:
                    problems.append(f"{where}: {probe} port {port!r} is not a container port")
            k = kvedit_argv(list(c.get("command", [])) + list(c.get("args", [])))
            http = kvedit_http(k) if k else None
            if http and http[0] == "kvedit serve":
                if http[1] != "0.0.0.0" or http[2] not in ports.values():
                    problems.append(f"{where}: kvedit serve on {http[1]}:{http[2]}, container ports {ports}")
                for probe in ("readinessProbe", "livenessProbe"):
                    get = c.get(probe, {}).get("httpGet", {})
                    if get.get("path") != "/health" or ports.get(get.get("port"), get.get("port")) != http[2]:
                        problems.append(f"{where}: {probe} must GET /health on port {http[2]}, has {get}")
    for where, d in docs:
        kind, spec = d["kind"], d.get("spec", {})
        pod_labels = spec.get("template", {}).get("metadata", {}).get("labels", {})
        if kind == "Deployment" and not set(spec["selector"]["matchLabels"].items()) <= set(pod_labels.items()):
            problems.append(f"{where}: Deployment {d['metadata']['name']}: selector does not match its pod labels")
        if kind == "Service":
            matched = [(w, t) for w, t, labels in pods if set(spec["selector"].items()) <= set(labels.items())]
            if not matched:
                problems.append(f"{where}: Service {d['metadata']['name']} selects no pod")
            for port in spec["ports"]:
                target = port.get("targetPort", port["port"])
                for w, t in matched:
                    known = {p.get("name") for c in t["spec"]["containers"] for p in c.get("ports", [])} | \
                            {p["containerPort"] for c in t["spec"]["containers"] for p in c.get("ports", [])}
                    if target not in known:
                        problems.append(f"{where}: Service {d['metadata']['name']} targets {target!r}, not a port of {w}")
        if kind == "RayJob" and "clusterSelector" in spec:
            cluster = spec["clusterSelector"].get("ray.io/cluster")
            if ("RayCluster", cluster) not in names:
                problems.append(f"{where}: RayJob {d['metadata']['name']} selects an undefined RayCluster {cluster!r}")
            http = kvedit_http(kvedit_argv(shell_commands(spec["entrypoint"])[0]))
            head = [t for _, t, labels in pods
                    if labels.get("ray.io/cluster") == cluster and labels.get("ray.io/node-type") == "head"]
            if http and not (http[1] == "0.0.0.0" and head and any(
                    p["containerPort"] == http[2] for c in head[0]["spec"]["containers"] for p in c.get("ports", []))):
                problems.append(f"{where}: the coordinator listens on {http[1]}:{http[2]}, not a port of the head pod")
        if kind == "ConfigMap" and "KVEDIT_REDIS_URL" in d.get("data", {}):
            host, _, port = d["data"]["KVEDIT_REDIS_URL"].split("//")[1].split("/")[0].partition(":")
            services = [x for _, x in docs if x["kind"] == "Service" and x["metadata"]["name"] == host]
            if not services or int(port or 6379) not in [p["port"] for p in services[0]["spec"]["ports"]]:
                problems.append(f"{where}: KVEDIT_REDIS_URL names {host}:{port}, which no Service exposes")
    assert not problems, "\n".join(problems)
