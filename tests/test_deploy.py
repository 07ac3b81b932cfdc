"""Tests for deploy/: the CloudFormation templates that run mtls-proxy on ECS Fargate behind an NLB and PrivateLink.

Owns: linting both templates with the venv's cfn-lint, and asserting what cfn-lint cannot know: ports that must agree
across resources, the PROXY-protocol target group, the private API's resource policy and the execute-api endpoint's
policy, the timeout and drain chain (integration timeout < read timeout <= drain, whole process tree inside
StopTimeout), scaling that can reach its target and is never reset by an update, valid Fargate sizes (the template's
Rules, evaluated here for every pair), the sources the proxy re-reads every ReloadInterval (certificate, key and
client CA in Secrets Manager, rules and CRL in the config bucket: nothing injected by ECS), the config bucket
(versioned, private, encrypted, TLS only), the task role's exact-ARN read access and conditional kms:Decrypt for
several deployments (``Deployment`` evaluates the template for given parameters), the first deploy without tasks,
an execution role without secrets, restricted task egress, retained and
optionally encrypted logs, the stage's access log, the alarms and the endpoint connection notification, the
container hardening, that every checkov suppression is explained in deploy/README.md, and that the task
definition's environment is a configuration ``proxy.config.load`` accepts.  Every check also runs against a
deliberately broken copy of the template (the BREAKAGES table), so a check that cannot fail is itself a failing test.

Must not: call AWS or the network; modify the templates.
"""

from __future__ import annotations

import copy
import json
import math
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cfnlint.decode import decode

from proxy.config import load
from proxy.config import rules as rules_doc
from proxy.sources import location
from proxy.metrics import HANDSHAKE_REASONS

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
PROVIDER = DEPLOY / "provider.yaml"
CONSUMER = DEPLOY / "consumer.yaml"
README = DEPLOY / "README.md"
CFN_LINT = Path(sys.executable).parent / "cfn-lint"

NO_VALUE = {"Ref": "AWS::NoValue"}
# Sample values for the parameters without a default, and for resources CloudFormation names at deploy time.
CERT_ARN = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:mtls-proxy/server-tls-AbCdEf"
KEY_ARN = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:mtls-proxy/server-key-GhIjKl"
CA_ARN = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:mtls-proxy/client-ca-MnOpQr"
SECRETS_KEY = "arn:aws:kms:eu-west-1:123456789012:key/0a1b2c3d-0000-1111-2222-333344445555"
CONFIG_KEY = "arn:aws:kms:eu-west-1:123456789012:key/9f8e7d6c-0000-1111-2222-333344445555"
CREATED_BUCKET = "mtls-proxy-configbucket-1a2b3c4d5e6f"
SAMPLE_PARAMS = {"ServerCertSecretArn": CERT_ARN, "ClientCaSecretArn": CA_ARN, "ImageUri": "img:1",
                 "VpcId": "vpc-0123456789abcdef0", "SubnetIds": "subnet-01234567,subnet-89abcdef",
                 "AllowedPrincipals": "arn:aws:iam::111122223333:root"}
PSEUDO = {"AWS::Region": "eu-west-1", "AWS::Partition": "aws", "AWS::URLSuffix": "amazonaws.com",
          "AWS::AccountId": "123456789012", "AWS::StackName": "mtls-proxy", "AWS::NoValue": None}
DEPLOYED = {"ConfigBucket": CREATED_BUCKET, "ConfigBucket.Arn": f"arn:aws:s3:::{CREATED_BUCKET}",
            "RestApi": "a1b2c3d4e5", "LogGroup": "mtls-proxy-LogGroup-x", "LogGroup.Arn": "arn:aws:logs:x"}
# The deployments every source and IAM check is evaluated for: the defaults (created bucket, key in the certificate
# secret, CRL, no customer key), an existing bucket with customer keys and a separate key secret, and no CRL.
SCENARIOS = {
    "defaults": {},
    "existing-bucket-customer-keys": {"ConfigBucketName": "acme-mtls-config", "ConfigKmsKeyArn": CONFIG_KEY,
                                      "SecretsKmsKeyArn": SECRETS_KEY, "ServerKeySecretArn": KEY_ARN},
    "no-crl": {"CrlObjectKey": "", "RulesObjectKey": "rules/partners.json", "ReloadInterval": "300"},
}
# Every action the proxy's task role may hold: what proxy/sources/aws.py calls, and nothing else.
TASK_ROLE_ACTIONS = {"s3:GetObject", "secretsmanager:DescribeSecret", "secretsmanager:GetSecretValue", "kms:Decrypt"}
PEM_SETTINGS = ("MTLS_PROXY_SERVER_CERT", "MTLS_PROXY_SERVER_KEY", "MTLS_PROXY_SERVER_CLIENT_CA",
                "MTLS_PROXY_SERVER_CRL", "MTLS_PROXY_ALLOW_FROM")
TG_ATTRIBUTE_KEYS = {
    "proxy_protocol_v2.enabled",
    "deregistration_delay.timeout_seconds",
    "deregistration_delay.connection_termination.enabled",
    "preserve_client_ip.enabled",
}
SAMPLE_RULES = [{"name": "partner-a", "subject_cn": ["partner-a-client"], "source_vpce": ["vpce-0123456789abcdef0"]}]

# Fargate's task sizes: TaskCpu -> the TaskMemory values (MiB) it accepts (AWS Fargate task CPU and memory table).
FARGATE_MEMORY = {
    256: {512, 1024, 2048},
    512: set(range(1024, 4097, 1024)),
    1024: set(range(2048, 8193, 1024)),
    2048: set(range(4096, 16385, 1024)),
    4096: set(range(8192, 30721, 1024)),
}
FARGATE_MAX_STOP_TIMEOUT = 120
# proxy/supervisor.py waits shutdown_timeout + 5 s for its workers before it kills them (only with workers > 1).
SUPERVISOR_GRACE = 5.0
# After the drain deadline: reset what is left, flush the access log, stop the admin port, exit.
EXIT_SLACK = 1.0
ALARM_METRIC_LIMIT = 10  # a metric math alarm may read at most 10 metrics (CloudWatch hard limit)
PROXY_NAMESPACE = {"Fn::Sub": "mtls-proxy/${AWS::StackName}"}
ALARM_TOPIC = {"Fn::If": ["CreateAlarmTopic", {"Ref": "AlarmTopic"}, {"Ref": "AlarmTopicArn"}]}

Template = dict[str, Any]


# --- loading and navigation ---------------------------------------------------------------------------------------
def _plain(node: Any) -> Any:
    """cfn-lint's decoder returns dict/str subclasses carrying line marks; plain values compare and copy simply."""
    if isinstance(node, dict):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    if isinstance(node, str):
        return str(node)
    return node


def _load(path: Path) -> Template:
    template, matches = decode(str(path))
    assert not matches and template is not None, [str(m) for m in matches]
    return _plain(template)


@pytest.fixture(scope="module")
def provider() -> Template:
    return _load(PROVIDER)


@pytest.fixture(scope="module")
def consumer() -> Template:
    return _load(CONSUMER)


def _ref(name: str) -> dict[str, str]:
    return {"Ref": name}


def _of_type(t: Template, type_: str) -> list[tuple[str, dict[str, Any]]]:
    return [(n, r.get("Properties", {})) for n, r in t["Resources"].items() if r["Type"] == type_]


def _one(t: Template, type_: str) -> tuple[str, dict[str, Any]]:
    found = _of_type(t, type_)
    assert len(found) == 1, f"expected exactly one {type_}, found {[n for n, _ in found]}"
    return found[0]


def _items(values: list[Any] | None) -> Iterator[Any]:
    """List items, with a conditional item (Fn::If [cond, item, AWS::NoValue]) counted as present."""
    for v in values or []:
        if isinstance(v, dict) and "Fn::If" in v:
            yield from (b for b in v["Fn::If"][1:] if b != NO_VALUE)
        else:
            yield v


def _branch(value: Any, conditions: dict[str, bool]) -> Any:
    """``value`` with every Fn::If resolved by ``conditions`` (condition name -> truth) and AWS::NoValue dropped."""
    if isinstance(value, dict):
        if "Fn::If" in value:
            name, yes, no = value["Fn::If"]
            assert name in conditions, f"no truth value given for condition {name}"
            return _branch(yes if conditions[name] else no, conditions)
        resolved = {k: _branch(v, conditions) for k, v in value.items()}
        return {k: v for k, v in resolved.items() if v != NO_VALUE}
    if isinstance(value, list):
        return [b for b in (_branch(v, conditions) for v in value) if b != NO_VALUE]
    return value


def _as_list(value: Any) -> list[Any]:
    return list(_items(value)) if isinstance(value, list) else [value]


def _container(t: Template) -> dict[str, Any]:
    _, td = _one(t, "AWS::ECS::TaskDefinition")
    containers = td.get("ContainerDefinitions", [])
    assert len(containers) == 1, "expected one container definition"
    return containers[0]


def _env(t: Template) -> dict[str, Any]:
    return {e["Name"]: e["Value"] for e in _items(_container(t).get("Environment"))}


def _port(listen: str) -> int:
    return int(listen.rsplit(":", 1)[1])


def _target_group(t: Template) -> tuple[str, dict[str, Any]]:
    return _one(t, "AWS::ElasticLoadBalancingV2::TargetGroup")


def _tg_ports(t: Template) -> tuple[int, int]:
    _, tg = _target_group(t)
    return int(tg.get("Port", 0)), int(tg.get("HealthCheckPort", 0))


def _statements(role: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for p in role.get("Policies", []) for s in _items(p["PolicyDocument"]["Statement"])]


def _execute_api_endpoint(t: Template) -> tuple[str, dict[str, Any]]:
    found = [(n, p) for n, p in _of_type(t, "AWS::EC2::VPCEndpoint")
             if "execute-api" in json.dumps(p.get("ServiceName"))]
    assert len(found) == 1, "expected one execute-api VPC endpoint"
    return found[0]


def _task_sg(t: Template) -> str:
    _, svc = _one(t, "AWS::ECS::Service")
    (task_sg,) = [g["Ref"] for g in svc["NetworkConfiguration"]["AwsvpcConfiguration"]["SecurityGroups"]]
    return task_sg  # type: ignore[no-any-return]


def _allowed(t: Template, param: str) -> list[str]:
    return [str(v) for v in t["Parameters"][param]["AllowedValues"]]


def _param_values(t: Template, **given: str) -> dict[str, str]:
    """Every parameter's value for a deployment: its default, unless given (a missing default stays unset)."""
    values = {n: str(p["Default"]) for n, p in t["Parameters"].items() if "Default" in p}
    return values | given


def _find_in_map(t: Template, value: Any, key: str) -> Any:
    """A Fn::FindInMap [map, {Ref: param}, attribute] looked up with ``key`` for the parameter."""
    name, _, attribute = value["Fn::FindInMap"]
    return t["Mappings"][name][key][attribute]


# --- template values the proxy sees, for every choice of its parameters ----------------------------------------------
def _workers(t: Template, cpu: str) -> int:
    """Worker processes a task of ``cpu`` units runs, as the template sets MTLS_PROXY_SERVER_WORKERS."""
    value = _env(t).get("MTLS_PROXY_SERVER_WORKERS", "1")
    if isinstance(value, dict) and "Fn::FindInMap" in value:
        assert value["Fn::FindInMap"][1] == _ref("TaskCpu"), "workers must follow TaskCpu"
        return int(_find_in_map(t, value, cpu))
    if isinstance(value, dict) and "Ref" in value:
        return int(t["Parameters"][value["Ref"]]["Default"])
    return int(value)


def _max_workers(t: Template) -> int:
    value = _env(t).get("MTLS_PROXY_SERVER_WORKERS", "1")
    if isinstance(value, dict) and "Ref" in value:  # an operator's choice: anything the parameter accepts
        return int(t["Parameters"][value["Ref"]].get("MaxValue", 256))
    return max(_workers(t, cpu) for cpu in _allowed(t, "TaskCpu"))


def _timing_rows(t: Template) -> dict[str, dict[str, float]]:
    """integration/read/shutdown/stop seconds, one row per ApiIntegrationTimeout (one row if the values are fixed)."""
    container, env = _container(t), _env(t)
    stop = container.get("StopTimeout", 30)  # Fargate's default when absent
    if not (isinstance(stop, dict) and "Fn::FindInMap" in stop):
        return {"fixed": {"integration": 29.0, "read": float(env.get("MTLS_PROXY_UPSTREAM_READ_TIMEOUT", "30")),
                          "shutdown": float(env.get("MTLS_PROXY_SERVER_SHUTDOWN_TIMEOUT", "25")),
                          "stop": float(stop)}}
    table = t["Mappings"][stop["Fn::FindInMap"][0]]
    return {key: {"integration": row["IntegrationMillis"] / 1000, "read": float(row["ReadTimeout"]),
                  "shutdown": float(row["ShutdownTimeout"]), "stop": float(row["StopTimeout"])}
            for key, row in table.items()}


def _rule_value(expr: Any, params: dict[str, str]) -> Any:
    """Evaluate a CloudFormation rule expression (the rule functions this template uses) against parameters."""
    if isinstance(expr, list):
        return [_rule_value(e, params) for e in expr]
    if not isinstance(expr, dict):
        return str(expr)
    ((fn, args),) = expr.items()
    if fn == "Ref":
        return params.get(args, "")
    if fn == "Fn::Equals":
        a, b = (_rule_value(a, params) for a in args)
        return a == b
    if fn == "Fn::Contains":
        return _rule_value(args[1], params) in _rule_value(args[0], params)
    if fn == "Fn::Not":
        return not _rule_value(args[0], params)
    if fn == "Fn::And":
        return all(_rule_value(a, params) for a in args)
    if fn == "Fn::Or":
        return any(_rule_value(a, params) for a in args)
    raise AssertionError(f"rule function {fn} is not evaluated by this test")


# The parameters without a usable default, as an operator passes them (README's deploy command).
DEPLOYMENT = {"EndpointsSecurityGroupId": "sg-0123456789abcdef0", "S3PrefixListId": "pl-6da54004"}


def _rule_failures(t: Template, **given: str) -> list[str]:
    """AssertDescriptions of the Rules a deployment with these parameter values (the others: defaults and
    DEPLOYMENT) fails: CloudFormation refuses it before creating anything."""
    params = _param_values(t, **(DEPLOYMENT | given))
    failed = []
    for name, rule in t.get("Rules", {}).items():
        if "RuleCondition" in rule and not _rule_value(rule["RuleCondition"], params):
            continue
        failed += [a.get("AssertDescription", name) for a in rule["Assertions"] if not _rule_value(a["Assert"], params)]
    return failed


def _alarms(t: Template) -> dict[str, dict[str, Any]]:
    return dict(_of_type(t, "AWS::CloudWatch::Alarm"))


def _alarm_metrics(alarm: dict[str, Any]) -> list[dict[str, Any]]:
    """(namespace, name, dimensions, stat) of every metric an alarm reads, simple or metric math."""
    if "Metrics" not in alarm:
        return [{"namespace": alarm.get("Namespace"), "name": alarm.get("MetricName"),
                 "dims": {d["Name"]: d["Value"] for d in alarm.get("Dimensions", [])},
                 "stat": alarm.get("Statistic")}]
    out = []
    for query in alarm["Metrics"]:
        if "MetricStat" in query:
            metric = query["MetricStat"]["Metric"]
            out.append({"namespace": metric.get("Namespace"), "name": metric.get("MetricName"),
                        "dims": {d["Name"]: d["Value"] for d in metric.get("Dimensions", [])},
                        "stat": query["MetricStat"].get("Stat"), "id": query["Id"]})
    return out


def _alarm_on(t: Template, namespace: Any, name: str, dims: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    found = [(n, a) for n, a in _alarms(t).items()
             if any(m["namespace"] == namespace and m["name"] == name and m["dims"] == dims
                    for m in _alarm_metrics(a))]
    assert len(found) == 1, f"expected one alarm on {name} {dims}, found {[n for n, _ in found]}"
    return found[0]


def _sg_rules(t: Template) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every security group rule (inline, both branches of a condition, and standalone), with its group's name."""
    for name, props in _of_type(t, "AWS::EC2::SecurityGroup"):
        for key in ("SecurityGroupIngress", "SecurityGroupEgress"):
            for rule in _items(props.get(key)):
                yield name, rule
    for type_ in ("AWS::EC2::SecurityGroupIngress", "AWS::EC2::SecurityGroupEgress"):
        for name, props in _of_type(t, type_):
            yield name, props


# --- the template evaluated for one deployment: parameters, conditions, and the names CloudFormation assigns -------
class Deployment:
    """The template's values as CloudFormation would resolve them for these parameters (defaults, SAMPLE_PARAMS,
    then ``given``), with the names in DEPLOYED standing in for the resources' physical ids."""

    def __init__(self, t: Template, **given: str) -> None:
        self.t = t
        self.params = _param_values(t, **(DEPLOYMENT | SAMPLE_PARAMS | given))
        self.conditions = {n: bool(self._condition(e)) for n, e in t.get("Conditions", {}).items()}

    def _condition(self, expr: Any) -> Any:
        if isinstance(expr, dict) and "Condition" in expr:
            return self._condition(self.t["Conditions"][expr["Condition"]])
        return _rule_value(expr, self.params)

    def lookup(self, name: str) -> Any:
        for table in (PSEUDO, self.params, DEPLOYED):
            if name in table:
                return table[name]
        raise AssertionError(f"nothing named {name} in this deployment")

    def exists(self, resource: str) -> bool:
        cond = self.t["Resources"][resource].get("Condition")
        return cond is None or self.conditions[cond]

    def value(self, v: Any) -> Any:
        """``v`` resolved: Ref, Fn::Sub (both forms), Fn::If, Fn::GetAtt, Fn::FindInMap; AWS::NoValue dropped."""
        if isinstance(v, list):
            return [x for x in (self.value(i) for i in v) if x is not None]
        if not isinstance(v, dict):
            return v
        if len(v) == 1:
            ((fn, args),) = v.items()
            if fn == "Ref":
                if args in self.t["Resources"]:
                    assert self.exists(args), f"Ref to {args}, which this deployment does not create"
                return self.lookup(args)
            if fn == "Fn::If":
                name, yes, no = args
                return self.value(yes if self.conditions[name] else no)
            if fn == "Fn::GetAtt":
                return self.lookup(".".join(args))
            if fn == "Fn::Sub":
                text, names = (args, {}) if isinstance(args, str) else (args[0], self.value(args[1]))
                return re.sub(r"\$\{([^}!]+)\}",
                              lambda m: str(names[m.group(1)] if m.group(1) in names else self.lookup(m.group(1))),
                              text)
            if fn == "Fn::FindInMap":
                name, key, attribute = (self.value(a) for a in args)
                return self.t["Mappings"][name][key][attribute]
            if fn == "Fn::Split":
                sep, text = args
                return self.value(text).split(sep)
        return {k: x for k, x in ((k, self.value(x)) for k, x in v.items()) if x is not None}

    def env(self) -> dict[str, str]:
        return {e["Name"]: str(e["Value"]) for e in self.value(_container(self.t).get("Environment", []))}

    def statements(self, role: str) -> list[dict[str, Any]]:
        props = self.value(self.t["Resources"][role]["Properties"])
        return [s for p in props.get("Policies", []) for s in p["PolicyDocument"]["Statement"]]

    @property
    def bucket(self) -> str:
        return self.params["ConfigBucketName"] or CREATED_BUCKET


def _deployments(t: Template) -> dict[str, Deployment]:
    return {name: Deployment(t, **given) for name, given in SCENARIOS.items()}


def _roles(t: Template) -> tuple[str, str]:
    """(execution role, task role) resource names, as the task definition names them."""
    _, td = _one(t, "AWS::ECS::TaskDefinition")
    return td["ExecutionRoleArn"]["Fn::GetAtt"][0], td["TaskRoleArn"]["Fn::GetAtt"][0]


# --- provider checks: each raises AssertionError when its property is broken --------------------------------------
def check_target_group(t: Template) -> None:
    _, tg = _target_group(t)
    assert tg.get("TargetType") == "ip" and tg.get("Protocol") == "TCP" and tg.get("Port") == 8443
    assert tg.get("HealthCheckProtocol") == "HTTP" and str(tg.get("HealthCheckPort")) == "9100"
    assert tg.get("HealthCheckPath") == "/readyz" and tg.get("HealthCheckEnabled", True) is True
    assert 5 <= tg.get("HealthCheckIntervalSeconds", 0) <= 300
    assert 2 <= tg.get("HealthyThresholdCount", 0) <= 10 and 2 <= tg.get("UnhealthyThresholdCount", 0) <= 10
    attrs = {a["Key"]: a["Value"] for a in tg.get("TargetGroupAttributes", [])}
    assert set(attrs) == TG_ATTRIBUTE_KEYS, f"unexpected target group attribute keys: {sorted(attrs)}"
    assert attrs["proxy_protocol_v2.enabled"] == "true"
    # The proxy's drain closes remaining connections; an NLB reset at the end of the delay would cut them.
    assert attrs["deregistration_delay.connection_termination.enabled"] == "false"
    assert attrs["preserve_client_ip.enabled"] == "false"
    # Non-zero so NLB nodes stop sending new flows before SIGTERM; below the 300 s default that slows deploys.
    assert 0 < int(attrs["deregistration_delay.timeout_seconds"]) < 300


def check_listener(t: Template) -> None:
    _, listener = _one(t, "AWS::ElasticLoadBalancingV2::Listener")
    nlb, _ = _one(t, "AWS::ElasticLoadBalancingV2::LoadBalancer")
    tg, _ = _target_group(t)
    assert listener.get("Port") == 443 and listener.get("Protocol") == "TCP"
    assert listener.get("LoadBalancerArn") == _ref(nlb)
    assert listener.get("DefaultActions") == [{"Type": "forward", "TargetGroupArn": _ref(tg)}]


def check_load_balancer(t: Template) -> None:
    _, nlb = _one(t, "AWS::ElasticLoadBalancingV2::LoadBalancer")
    assert nlb.get("Type") == "network" and nlb.get("Scheme") == "internal"
    attrs = {a["Key"]: a["Value"] for a in nlb.get("LoadBalancerAttributes", [])}
    assert attrs.get("load_balancing.cross_zone.enabled") == "true"
    assert nlb.get("SecurityGroups"), "the tasks' ingress rules reference the NLB's security group"


def check_security_groups(t: Template) -> None:
    tls_port, admin_port = _tg_ports(t)
    task_sg = _task_sg(t)
    _, nlb = _one(t, "AWS::ElasticLoadBalancingV2::LoadBalancer")
    (nlb_sg,) = [g["Ref"] for g in nlb["SecurityGroups"]]
    groups = t["Resources"]
    assert not groups[task_sg]["Properties"].get("SecurityGroupIngress"), "task ingress only via the NLB rules"
    ingress = {(p["FromPort"], p["ToPort"], json.dumps(p.get("SourceSecurityGroupId")), p.get("CidrIp"))
               for _, p in _of_type(t, "AWS::EC2::SecurityGroupIngress") if p["GroupId"] == _ref(task_sg)}
    src = json.dumps(_ref(nlb_sg))
    assert ingress == {(tls_port, tls_port, src, None), (admin_port, admin_port, src, None)}
    nlb_props = groups[nlb_sg]["Properties"]
    assert not nlb_props.get("SecurityGroupIngress"), "PrivateLink traffic only: no inbound rule on the NLB"
    assert nlb.get("EnforceSecurityGroupInboundRulesOnPrivateLinkTraffic") == "off"
    egress = {(e["FromPort"], json.dumps(e.get("DestinationSecurityGroupId")))
              for e in nlb_props["SecurityGroupEgress"]}
    assert egress == {(tls_port, json.dumps(_ref(task_sg))), (admin_port, json.dumps(_ref(task_sg)))}
    _, endpoint = _execute_api_endpoint(t)
    (ep_sg,) = [g["Ref"] for g in endpoint["SecurityGroupIds"]]
    ep_ingress = [*groups[ep_sg]["Properties"].get("SecurityGroupIngress", []),
                  *(p for _, p in _of_type(t, "AWS::EC2::SecurityGroupIngress") if p["GroupId"] == _ref(ep_sg))]
    assert [(r["FromPort"], r["ToPort"], r.get("SourceSecurityGroupId"), r.get("CidrIp")) for r in ep_ingress] == [
        (443, 443, _ref(task_sg), None)]


def check_security_group_rules_described(t: Template) -> None:
    # The reason the checkov finding CKV_AWS_23 is suppressed: checkov cannot see inside Fn::If, this test can.
    for group, rule in _sg_rules(t):
        assert str(rule.get("Description", "")).strip(), f"a rule of {group} has no Description"


def check_task_egress(t: Template) -> None:
    task_sg = _task_sg(t)
    props = t["Resources"][task_sg]["Properties"]
    mode = t["Parameters"].get("EgressMode", {})
    assert mode.get("Default") == "endpoints", "task egress must be restricted by default (EgressMode endpoints)"
    standalone = [n for n, p in _of_type(t, "AWS::EC2::SecurityGroupEgress") if p["GroupId"] == _ref(task_sg)]
    assert not standalone, f"task egress is inline only (an update of inline rules would compete with {standalone})"
    _, endpoint = _execute_api_endpoint(t)
    (ep_sg,) = [g["Ref"] for g in endpoint["SecurityGroupIds"]]

    def destinations(via_endpoints: bool) -> set[tuple[int, int, str]]:
        rules = _branch(props.get("SecurityGroupEgress", []), {"EgressViaEndpoints": via_endpoints})
        out = set()
        for r in rules:
            dest = [k for k in ("CidrIp", "CidrIpv6", "DestinationSecurityGroupId", "DestinationPrefixListId") if k in r]
            assert len(dest) == 1, r
            out.add((r["FromPort"], r["ToPort"], json.dumps({dest[0]: r[dest[0]]})))
        return out

    https = (443, 443)
    assert destinations(True) == {
        (*https, json.dumps({"DestinationSecurityGroupId": _ref(ep_sg)})),
        (*https, json.dumps({"DestinationSecurityGroupId": _ref("EndpointsSecurityGroupId")})),
        (*https, json.dumps({"DestinationPrefixListId": _ref("S3PrefixListId")})),
    }, "EgressMode endpoints: HTTPS to the execute-api endpoint, the interface endpoints and S3 only"
    assert destinations(False) == {
        (*https, json.dumps({"DestinationSecurityGroupId": _ref(ep_sg)})),
        (*https, json.dumps({"CidrIp": "0.0.0.0/0"})),
    }, "EgressMode nat: the execute-api endpoint, and HTTPS anywhere"
    admitted = [(n, p) for n, p in _of_type(t, "AWS::EC2::SecurityGroupIngress")
                if p["GroupId"] == _ref("EndpointsSecurityGroupId")]
    assert len(admitted) == 1 and t["Resources"][admitted[0][0]].get("Condition") == "EgressViaEndpoints"
    assert admitted[0][1].get("SourceSecurityGroupId") == _ref(task_sg) and admitted[0][1]["FromPort"] == 443
    # The rule refuses endpoints mode without its two inputs, before anything is created.
    for missing in DEPLOYMENT:
        assert _rule_failures(t, EgressMode="endpoints", **{missing: ""}), f"endpoints mode accepted without {missing}"
    assert not _rule_failures(t) and not _rule_failures(t, EgressMode="nat", **dict.fromkeys(DEPLOYMENT, ""))
    for name, value in DEPLOYMENT.items():
        assert re.fullmatch(t["Parameters"][name]["AllowedPattern"], value), name


def check_private_api(t: Template) -> None:
    endpoint, ep = _execute_api_endpoint(t)
    assert ep.get("VpcEndpointType") == "Interface" and ep.get("PrivateDnsEnabled") is True
    _, api = _one(t, "AWS::ApiGateway::RestApi")
    config = api.get("EndpointConfiguration", {})
    assert config.get("Types") == ["PRIVATE"] and config.get("VpcEndpointIds") == [_ref(endpoint)]
    statements = api.get("Policy", {}).get("Statement", [])
    invoke = [s for s in statements if "execute-api:Invoke" in _as_list(s.get("Action"))
              and s.get("Principal") == "*" and "execute-api:/*" in _as_list(s.get("Resource"))]
    denies = [s for s in invoke if s.get("Effect") == "Deny"]
    assert [s.get("Condition") for s in denies] == [{"StringNotEquals": {"aws:SourceVpce": _ref(endpoint)}}]
    assert any(s.get("Effect") == "Allow" and "Condition" not in s for s in invoke), "no Allow for execute-api"


def check_execute_api_endpoint_policy(t: Template) -> None:
    _, ep = _execute_api_endpoint(t)
    statements = ep.get("PolicyDocument", {}).get("Statement", [])
    assert statements, "the execute-api endpoint needs a policy (the default allows every API of every account)"
    own = "arn:${AWS::Partition}:execute-api:${AWS::Region}:${AWS::AccountId}:"
    for s in statements:
        assert s.get("Effect") == "Allow" and _as_list(s.get("Action")) == ["execute-api:Invoke"], s
        for resource in _as_list(s.get("Resource")):
            assert isinstance(resource, dict) and resource.get("Fn::Sub", "").startswith(own), (
                f"endpoint policy resource {resource!r} is not limited to this account's APIs in this Region")


def check_timeouts_follow_integration(t: Template) -> None:
    param = t["Parameters"].get("ApiIntegrationTimeout")
    assert param, "the API's integration timeout must be a parameter the proxy's timeouts follow"
    container, env = _container(t), _env(t)
    key = _ref("ApiIntegrationTimeout")
    for value in (container["StopTimeout"], env["MTLS_PROXY_SERVER_SHUTDOWN_TIMEOUT"],
                  env["MTLS_PROXY_UPSTREAM_READ_TIMEOUT"]):
        assert isinstance(value, dict) and value.get("Fn::FindInMap", [])[:2] == ["DrainTiming", key], value
    _, method = _one(t, "AWS::ApiGateway::Method")
    assert method["Integration"].get("TimeoutInMillis") == {
        "Fn::FindInMap": ["DrainTiming", key, "IntegrationMillis"]}, "the integration keeps API Gateway's default"
    rows = _timing_rows(t)
    assert set(rows) == set(_allowed(t, "ApiIntegrationTimeout")) and param["Default"] in rows
    assert "29" in rows, "API Gateway's default integration timeout must be deployable"
    for name, row in rows.items():
        assert row["integration"] == float(name), f"row {name}: IntegrationMillis does not match its key"
        # The gateway's own 504 must reach the client before the proxy gives up and answers one itself.
        assert row["read"] > row["integration"], f"row {name}: read_timeout must exceed the integration timeout"
        # A request that starts just before SIGTERM may run its full time inside the drain.
        assert row["shutdown"] >= row["read"], f"row {name}: the drain is shorter than a request may take"


def check_drain_budget(t: Template) -> None:
    # The whole process tree: with workers, the supervisor (PID 1's child) waits for its workers' drain plus its
    # grace period, kills what is left, and only then exits. ECS sends SIGKILL at StopTimeout.
    grace = SUPERVISOR_GRACE if _max_workers(t) > 1 else 0.0
    for name, row in _timing_rows(t).items():
        budget = row["shutdown"] + grace + EXIT_SLACK
        assert budget < row["stop"] <= FARGATE_MAX_STOP_TIMEOUT, (
            f"row {name}: the process tree may take {budget:g} s to exit, SIGKILL comes at {row['stop']:g} s")


def check_ports(t: Template) -> None:
    tls_port, admin_port = _tg_ports(t)
    container, env = _container(t), _env(t)
    assert {m["ContainerPort"] for m in container.get("PortMappings", [])} == {tls_port, admin_port}
    assert _port(env["MTLS_PROXY_SERVER_LISTEN"]) == tls_port
    # The admin port must listen beyond loopback (its default) or the NLB health check never reaches it.
    assert env["MTLS_PROXY_ADMIN_LISTEN"] == f"0.0.0.0:{admin_port}"
    tg, _ = _target_group(t)
    _, svc = _one(t, "AWS::ECS::Service")
    assert svc.get("LoadBalancers") == [
        {"ContainerName": container["Name"], "ContainerPort": tls_port, "TargetGroupArn": _ref(tg)}]
    assert f"127.0.0.1:{admin_port}/healthz" in " ".join(container["HealthCheck"]["Command"])


def check_sources_are_polled(t: Template) -> None:
    """The proxy reads its certificate, key, client CA, CRL and rules itself, from sources it re-reads every
    ReloadInterval: nothing is injected by ECS (read once at task start), nothing is fixed in the task definition."""
    container = _container(t)
    assert "Secrets" not in container, "ECS-injected secrets are read once, at task start: rotation needs new tasks"
    assert t["Parameters"]["ReloadInterval"]["Type"] == "Number"
    default = float(t["Parameters"]["ReloadInterval"]["Default"])
    # Often enough that a revocation is live within minutes; not so often that polling costs (every worker polls).
    assert 10 <= default <= 300, f"ReloadInterval default {default:g} s"
    assert float(t["Parameters"]["ReloadInterval"]["MinValue"]) >= 5
    assert float(t["Parameters"]["ReloadInterval"]["MaxValue"]) <= 3600
    for name, d in _deployments(t).items():
        env = d.env()
        key_arn = d.params["ServerKeySecretArn"] or d.params["ServerCertSecretArn"]
        expected = {
            "MTLS_PROXY_SERVER_CERT": f"secretsmanager:{d.params['ServerCertSecretArn']}",
            "MTLS_PROXY_SERVER_KEY": f"secretsmanager:{key_arn}",
            "MTLS_PROXY_SERVER_CLIENT_CA": f"secretsmanager:{d.params['ClientCaSecretArn']}",
            "MTLS_PROXY_ALLOW_FROM": f"s3://{d.bucket}/{d.params['RulesObjectKey']}",
        }
        if d.params["CrlObjectKey"]:
            expected["MTLS_PROXY_SERVER_CRL"] = f"s3://{d.bucket}/{d.params['CrlObjectKey']}"
        sources = {k: v for k, v in env.items() if k in PEM_SETTINGS}
        assert sources == expected, f"{name}: {sources}"
        for setting, text in sources.items():
            assert location.parse_location(text).kind in ("secretsmanager", "s3"), (name, setting, text)
        assert "MTLS_PROXY_ALLOW" not in env, f"{name}: rules fixed in the task definition"
        assert env.get("MTLS_PROXY_SERVER_RELOAD_INTERVAL") == d.params["ReloadInterval"], (
            f"{name}: the proxy must poll every ReloadInterval")
        assert float(env["MTLS_PROXY_SERVER_RELOAD_INTERVAL"]) > 0, f"{name}: 0 turns polling off"
        assert env.get("AWS_REGION") == PSEUDO["AWS::Region"], name


def _wildcard(resource: Any) -> bool:
    return not isinstance(resource, str) or any(ch in resource for ch in "*?$")


def check_task_role_least_privilege(t: Template) -> None:
    """The task role reads exactly the sources the environment names: GetObject on the two objects, the two
    Secrets Manager read calls on the secrets, kms:Decrypt only for a given customer key and only through that
    service. No resource is a wildcard; no other action, no managed policy."""
    _, task_role = _roles(t)
    props = t["Resources"][task_role]["Properties"]
    assert "ManagedPolicyArns" not in props, "a managed policy could grant more than the sources"
    for name, d in _deployments(t).items():
        env, statements = d.env(), d.statements(task_role)
        granted: dict[str, set[str]] = {}
        for s in statements:
            assert s["Effect"] == "Allow" and "NotAction" not in s and "NotResource" not in s, (name, s)
            actions, resources = _as_list(s["Action"]), _as_list(s["Resource"])
            assert set(actions) <= TASK_ROLE_ACTIONS, f"{name}: {s.get('Sid')} grants {actions}"
            for r in resources:
                assert not _wildcard(r), f"{name}: {s.get('Sid')} grants on {r!r}"
            for a in actions:
                granted.setdefault(a, set()).update(resources)
            if "kms:Decrypt" in actions:
                assert actions == ["kms:Decrypt"] and len(resources) == 1, (name, s)
                service = "secretsmanager" if resources[0] == d.params["SecretsKmsKeyArn"] else "s3"
                assert s.get("Condition") == {"StringEquals": {
                    "kms:ViaService": f"{service}.{PSEUDO['AWS::Region']}.amazonaws.com"}}, (name, s)
        objects = {f"arn:aws:s3:::{v[len('s3://'):]}" for v in env.values() if v.startswith("s3://")}
        secrets = {v.split(":", 1)[1] for k, v in env.items() if v.startswith("secretsmanager:")}
        assert granted.get("s3:GetObject") == objects, f"{name}: GetObject on {granted.get('s3:GetObject')}"
        assert granted.get("secretsmanager:GetSecretValue") == secrets, name
        # DescribeSecret is how an unchanged secret costs no decryption (proxy/sources/aws.py).
        assert granted.get("secretsmanager:DescribeSecret") == secrets, name
        keys = {d.params[k] for k in ("SecretsKmsKeyArn", "ConfigKmsKeyArn") if d.params[k]}
        assert granted.get("kms:Decrypt", set()) == keys, f"{name}: kms:Decrypt on {granted.get('kms:Decrypt')}"


def check_execution_role_reads_no_secrets(t: Template) -> None:
    """ECS itself no longer fetches a secret: the execution role pulls the image and writes logs, nothing more."""
    execution_role, _ = _roles(t)
    props = t["Resources"][execution_role]["Properties"]
    assert "ManagedPolicyArns" not in props, "a managed policy could grant secret access"
    for name, d in _deployments(t).items():
        for s in d.statements(execution_role):
            for action in _as_list(s["Action"]):
                assert action.split(":")[0] in ("ecr", "logs"), f"{name}: the execution role may {action}"
    assert "Secrets" not in _container(t)


def check_config_bucket(t: Template) -> None:
    """The created bucket is versioned (rollback), private, encrypted (with the customer key when given) and
    refuses plain HTTP; an existing bucket is used as it is (a bucket policy would replace its owner's)."""
    bucket = t["Resources"]["ConfigBucket"]
    assert bucket["Type"] == "AWS::S3::Bucket" and bucket.get("Condition") == "CreateConfigBucket"
    assert t["Conditions"]["CreateConfigBucket"] == {"Fn::Equals": [_ref("ConfigBucketName"), ""]}
    assert bucket.get("DeletionPolicy") == "Retain" and bucket.get("UpdateReplacePolicy") == "Retain"
    policies = _of_type(t, "AWS::S3::BucketPolicy")
    assert len(policies) == 1, "the created bucket needs its TLS-only bucket policy"
    ((policy_name, _),) = policies
    assert t["Resources"][policy_name].get("Condition") == "CreateConfigBucket"
    for given, kms in (({}, None), ({"ConfigKmsKeyArn": CONFIG_KEY}, CONFIG_KEY)):
        d = Deployment(t, **given)
        assert d.exists("ConfigBucket") and d.exists(policy_name)
        props = d.value(bucket["Properties"])
        assert props.get("VersioningConfiguration") == {"Status": "Enabled"}
        assert props.get("PublicAccessBlockConfiguration") == {
            "BlockPublicAcls": True, "BlockPublicPolicy": True, "IgnorePublicAcls": True,
            "RestrictPublicBuckets": True}
        assert "BucketEncryption" in props, "default encryption must be set (and chosen: the customer key)"
        (rule,) = props["BucketEncryption"]["ServerSideEncryptionConfiguration"]
        default = rule["ServerSideEncryptionByDefault"]
        if kms:
            assert default == {"SSEAlgorithm": "aws:kms", "KMSMasterKeyID": kms}, default
            assert rule.get("BucketKeyEnabled") is True
        else:
            assert default in ({"SSEAlgorithm": "AES256"}, {"SSEAlgorithm": "aws:kms"}), default
        policy = d.value(t["Resources"][policy_name]["Properties"])
        assert policy["Bucket"] == CREATED_BUCKET
        arn = DEPLOYED["ConfigBucket.Arn"]
        tls_only = [s for s in policy["PolicyDocument"]["Statement"]
                    if s["Effect"] == "Deny" and s.get("Principal") == "*"
                    and set(_as_list(s["Action"])) == {"s3:*"}
                    and {arn, f"{arn}/*"} <= set(_as_list(s["Resource"]))
                    and s.get("Condition") == {"Bool": {"aws:SecureTransport": "false"}}]
        assert tls_only, "the bucket must refuse requests without TLS (aws:SecureTransport false)"
    existing = Deployment(t, ConfigBucketName="acme-mtls-config")
    assert not existing.exists("ConfigBucket") and not existing.exists(policy_name)
    # Names and keys end up in IAM ARNs: none may carry a wildcard or a policy variable, none may be malformed.
    patterns = {k: t["Parameters"][k]["AllowedPattern"] for k in ("ConfigBucketName", "RulesObjectKey",
                                                                   "CrlObjectKey")}
    for key, pattern in patterns.items():
        assert re.fullmatch(pattern, str(t["Parameters"][key]["Default"])), key
        for bad in ("*", "a*", "partners/*", "a?b", "${aws:username}", "/rules.toml", "a//b", "a/"):
            assert not re.fullmatch(pattern, bad), f"{key} accepts {bad!r}"
    assert re.fullmatch(patterns["ConfigBucketName"], "acme-mtls-config")
    assert not re.fullmatch(patterns["ConfigBucketName"], "Acme_Config")
    assert not re.fullmatch(patterns["RulesObjectKey"], ""), "the rules document is required"
    assert re.fullmatch(patterns["CrlObjectKey"], ""), "no CRL must stay possible"


def check_first_deploy_without_tasks(t: Template) -> None:
    """With a created bucket nothing can be uploaded before the stack exists, and a task refuses to start without
    its rules: StartProxyTasks false creates everything but the service (and what watches or scales it)."""
    param = t["Parameters"]["StartProxyTasks"]
    assert param["Default"] == "true" and sorted(param["AllowedValues"]) == ["false", "true"]
    off, on = Deployment(t, StartProxyTasks="false"), Deployment(t)
    service, _ = _one(t, "AWS::ECS::Service")
    assert on.exists(service) and not off.exists(service)
    assert off.exists("ConfigBucket") and off.exists("TaskDefinition") and off.exists("TaskRole")
    refs = (json.dumps(_ref(service)), f'["{service}", ', f"${{{service}.", f"${{{service}}}")
    for name, resource in t["Resources"].items():
        if any(r in json.dumps(resource) for r in refs):
            assert not off.exists(name), f"{name} refers to the service, which StartProxyTasks false leaves out"
    for name, alarm in _alarms(t).items():
        if alarm.get("TreatMissingData") == "breaching":  # would fire while no task runs
            assert not off.exists(name), name


def check_container_hardening(t: Template) -> None:
    container = _container(t)
    assert container.get("ReadonlyRootFilesystem") is True and not container.get("Privileged")
    linux = container.get("LinuxParameters", {})
    writable = {m["ContainerPath"] for m in linux.get("Tmpfs", [])} | {
        m["ContainerPath"] for m in container.get("MountPoints", []) if not m.get("ReadOnly")}
    assert "/tmp" in writable, "the read-only image needs a writable /tmp"
    assert "ALL" in linux.get("Capabilities", {}).get("Drop", [])
    user = container.get("User")
    assert isinstance(user, dict) and "Ref" in user, "User must come from the validated ContainerUser parameter"
    param = t["Parameters"][user["Ref"]]
    assert re.fullmatch(param["AllowedPattern"], param["Default"])
    for root in ("0", "0:0", "root", "0:1000", ""):
        assert not re.fullmatch(param["AllowedPattern"], root), f"ContainerUser accepts root ({root!r})"


def check_log_groups(t: Template) -> None:
    groups = _of_type(t, "AWS::Logs::LogGroup")
    assert groups, "no log group"
    for name, props in groups:
        resource = t["Resources"][name]
        # An audit trail: neither a stack deletion nor a replacement may delete it.
        assert resource.get("DeletionPolicy") == "Retain" and resource.get("UpdateReplacePolicy") == "Retain", name
        assert props.get("RetentionInDays") == _ref("LogRetentionDays"), f"{name} keeps logs forever or not at all"
        assert props.get("KmsKeyId") == {"Fn::If": ["HasLogsKmsKey", _ref("LogsKmsKeyArn"), NO_VALUE]}, name
    pattern = t["Parameters"]["LogsKmsKeyArn"]["AllowedPattern"]
    assert re.fullmatch(pattern, "arn:aws:kms:eu-west-1:123456789012:key/0a1b") and re.fullmatch(pattern, "")
    assert t["Conditions"]["HasLogsKmsKey"] == {"Fn::Not": [{"Fn::Equals": [_ref("LogsKmsKeyArn"), ""]}]}


def check_access_log_delivery(t: Template) -> None:
    logs = _container(t).get("LogConfiguration", {})
    assert logs.get("LogDriver") == "awslogs"
    groups = dict(_of_type(t, "AWS::Logs::LogGroup"))
    assert logs["Options"].get("awslogs-group", {}).get("Ref") in groups
    # blocking: the driver never drops a line; the pressure reaches the proxy's bounded non-blocking writer, which
    # keeps serving and counts what it drops (LogLinesDropped, alarmed below). non-blocking drops lines unseen.
    assert logs["Options"].get("mode") == "blocking", "awslogs non-blocking mode drops access-log lines silently"
    assert "max-buffer-size" not in logs["Options"], "max-buffer-size applies to non-blocking mode only"


def check_stage_access_logs(t: Template) -> None:
    stage_name, stage = _one(t, "AWS::ApiGateway::Stage")
    setting = stage.get("AccessLogSetting", {})
    destination = setting.get("DestinationArn", {}).get("Fn::GetAtt", [None])
    groups = dict(_of_type(t, "AWS::Logs::LogGroup"))
    assert destination[0] in groups and destination[1:] == ["Arn"], "stage access logs must go to a log group here"
    fields = json.loads(setting["Format"])  # one JSON object per request
    assert {"requestId", "vpceId", "status", "httpMethod", "path"} <= set(fields)
    # API Gateway writes access logs with the account's CloudWatch role: the stage must wait for that setting.
    account, props = _one(t, "AWS::ApiGateway::Account")
    assert account in _as_list(t["Resources"][stage_name].get("DependsOn", []))
    role = t["Resources"]["ApiGatewayCloudWatchRole"]
    assert props["CloudWatchRoleArn"] == {"Fn::If": ["CreateApiGatewayRole", {
        "Fn::GetAtt": ["ApiGatewayCloudWatchRole", "Arn"]}, _ref("ApiGatewayCloudWatchRoleArn")]}
    assert role.get("Condition") == "CreateApiGatewayRole"
    # The account setting outlives the stack (other APIs log through it): so must the role.
    assert role.get("DeletionPolicy") == "Retain" and t["Resources"][account].get("DeletionPolicy") == "Retain"
    (trust,) = role["Properties"]["AssumeRolePolicyDocument"]["Statement"]
    assert trust["Principal"] == {"Service": "apigateway.amazonaws.com"}


def check_service(t: Template) -> None:
    name, svc = _one(t, "AWS::ECS::Service")
    _, td = _one(t, "AWS::ECS::TaskDefinition")
    assert svc.get("LaunchType") == "FARGATE" and "CapacityProviderStrategy" not in svc
    assert td.get("RequiresCompatibilities") == ["FARGATE"] and td.get("NetworkMode") == "awsvpc"
    vpc = svc.get("NetworkConfiguration", {}).get("AwsvpcConfiguration", {})
    assert vpc.get("AssignPublicIp") == "DISABLED"
    assert svc.get("DeploymentConfiguration", {}).get("DeploymentCircuitBreaker", {}).get("Enable") is True
    assert svc.get("HealthCheckGracePeriodSeconds", 0) > 0
    listener, _ = _one(t, "AWS::ElasticLoadBalancingV2::Listener")
    assert listener in _as_list(t["Resources"][name].get("DependsOn", []))
    _, target = _one(t, "AWS::ApplicationAutoScaling::ScalableTarget")
    assert f"${{{name}.Name}}" in target.get("ResourceId", {}).get("Fn::Sub", "")
    _, policy = _one(t, "AWS::ApplicationAutoScaling::ScalingPolicy")
    metric = policy["TargetTrackingScalingPolicyConfiguration"]["PredefinedMetricSpecification"]
    assert metric["PredefinedMetricType"] == "ECSServiceAverageCPUUtilization"


def check_no_desired_count(t: Template) -> None:
    # CloudFormation re-sends DesiredCount on every service update (a rules change is a new task definition), which
    # resets a scaled-out service to it mid-rollout; without it, updates keep the count auto scaling chose.
    _, svc = _one(t, "AWS::ECS::Service")
    _, target = _one(t, "AWS::ApplicationAutoScaling::ScalableTarget")
    assert target.get("ScalableDimension") == "ecs:service:DesiredCount"
    assert "DesiredCount" not in svc, "DesiredCount next to auto scaling resets the service on every update"
    assert target.get("MinCapacity") == _ref("MinCount") and target.get("MaxCapacity") == _ref("MaxCount")


def check_scaling_can_reach_target(t: Template) -> None:
    # ECS measures a service's CPU against the task's CPU; one worker process uses at most one vCPU. With fewer
    # workers than vCPUs the utilisation tops out below the target and target tracking never scales out.
    target = t["Parameters"]["CpuTargetPercent"]
    for cpu in _allowed(t, "TaskCpu"):
        workers, vcpus = _workers(t, cpu), int(cpu) / 1024
        reachable = 100 * min(1.0, workers / vcpus)
        assert reachable >= target["MaxValue"], (
            f"TaskCpu {cpu}: {workers} worker(s) reach {reachable:.0f} % CPU, the target may be {target['MaxValue']} %")
        assert workers <= max(1, math.ceil(vcpus)), f"TaskCpu {cpu}: more workers than vCPUs"


def check_fargate_sizes(t: Template) -> None:
    cpus, memories = _allowed(t, "TaskCpu"), _allowed(t, "TaskMemory")
    for cpu in cpus:
        valid = FARGATE_MEMORY[int(cpu)]
        assert {str(m) for m in valid} <= set(memories), f"TaskCpu {cpu}: some valid TaskMemory values not offered"
        for memory in memories:
            accepted = not _rule_failures(t, TaskCpu=cpu, TaskMemory=memory)
            assert accepted == (int(memory) in valid), (
                f"TaskCpu {cpu} / TaskMemory {memory}: the template {'accepts' if accepted else 'refuses'} it, "
                f"Fargate {'accepts' if int(memory) in valid else 'refuses'} it")


def check_subnets(t: Template) -> None:
    param = t["Parameters"]["SubnetIds"]
    pattern = param.get("AllowedPattern")
    assert pattern, "SubnetIds must be refused with fewer than two subnets (a pattern: rules cannot count a list)"
    one, two = "subnet-0123456789abcdef0", "subnet-0123456789abcdef0,subnet-0fedcba9876543210"
    assert not re.fullmatch(pattern, one), "a single subnet (one Availability Zone) is accepted"
    assert re.fullmatch(pattern, two) and re.fullmatch(pattern, f"{two},subnet-01234567")
    for bad in (f"{one},", f"{one}, subnet-0fedcba9876543210", "subnet-xyz,subnet-abc", ""):
        assert not re.fullmatch(pattern, bad), bad
    split = {"Fn::Split": [",", _ref("SubnetIds")]}
    _, svc = _one(t, "AWS::ECS::Service")
    _, nlb = _one(t, "AWS::ElasticLoadBalancingV2::LoadBalancer")
    _, endpoint = _execute_api_endpoint(t)
    assert svc["NetworkConfiguration"]["AwsvpcConfiguration"]["Subnets"] == split
    assert nlb["Subnets"] == split and endpoint["SubnetIds"] == split


def check_alarms(t: Template) -> None:
    alarms = _alarms(t)
    for name, alarm in alarms.items():
        assert alarm.get("AlarmActions") == [ALARM_TOPIC] and alarm.get("OKActions") == [ALARM_TOPIC], name
        assert str(alarm.get("AlarmDescription", "")).strip(), f"{name}: say what to do when it fires"
        metrics = _alarm_metrics(alarm)
        assert len(metrics) <= ALARM_METRIC_LIMIT, f"{name}: a metric math alarm reads at most 10 metrics"
    # Certificates: server, each client CA, the CRL's nextUpdate, within CertExpiryWarningDays (14 by default).
    assert alarms, "no alarms"
    assert t["Parameters"].get("CertExpiryWarningDays", {}).get("Default") == 14
    for kind, condition in (("server", None), ("client_ca", None), ("crl", "HasCrl")):
        name, alarm = _alarm_on(t, PROXY_NAMESPACE, "CertDaysToExpiry", {"CertKind": kind})
        assert alarm["Statistic"] == "Minimum" and alarm["ComparisonOperator"] == "LessThanThreshold", name
        assert alarm["Threshold"] == _ref("CertExpiryWarningDays"), name
        assert t["Resources"][name].get("Condition") == condition, name
    # Handshake failures: each reason the proxy counts, against one threshold.
    name, alarm = _alarm_on(t, PROXY_NAMESPACE, "HandshakeFailures", {"Reason": HANDSHAKE_REASONS[0]})
    reasons = [m["dims"].get("Reason") for m in _alarm_metrics(alarm)]
    assert sorted(reasons) == sorted(HANDSHAKE_REASONS), f"{name} watches {reasons}"
    (expression,) = [q for q in alarm["Metrics"] if q.get("ReturnData")]
    for m in _alarm_metrics(alarm):
        assert m["stat"] == "Sum" and re.search(rf"\b{m['id']}\b", expression["Expression"]), m
    assert alarm["Threshold"] == _ref("HandshakeFailureThreshold")
    _, alarm = _alarm_on(t, PROXY_NAMESPACE, "UpstreamErrors", {})
    assert alarm["Statistic"] == "Sum" and alarm["Threshold"] == _ref("UpstreamErrorThreshold")
    # 5xx rate of the proxy: the 5xx class over all requests.
    name, alarm = _alarm_on(t, PROXY_NAMESPACE, "Requests", {"StatusClass": "5xx"})
    assert any(m["name"] == "Requests" and m["dims"] == {} for m in _alarm_metrics(alarm)), name
    assert alarm["Threshold"] == _ref("ErrorRatePercent")
    # The API's own 5XX, by the dimensions API Gateway publishes for a REST API stage.
    _, api = _one(t, "AWS::ApiGateway::RestApi")
    _, stage = _one(t, "AWS::ApiGateway::Stage")
    _, alarm = _alarm_on(t, "AWS/ApiGateway", "5XXError", {"ApiName": api["Name"], "Stage": stage["StageName"]})
    assert alarm["Threshold"] == _ref("ErrorRatePercent")
    nlb, _ = _one(t, "AWS::ElasticLoadBalancingV2::LoadBalancer")
    tg, _ = _target_group(t)
    _, alarm = _alarm_on(t, "AWS/NetworkELB", "UnHealthyHostCount", {
        "LoadBalancer": {"Fn::GetAtt": [nlb, "LoadBalancerFullName"]},
        "TargetGroup": {"Fn::GetAtt": [tg, "TargetGroupFullName"]}})
    assert alarm["ComparisonOperator"] == "GreaterThanThreshold" and alarm["Threshold"] == 0
    cluster, cluster_props = _one(t, "AWS::ECS::Cluster")
    service, _ = _one(t, "AWS::ECS::Service")
    assert {"Name": "containerInsights", "Value": "enabled"} in cluster_props.get("ClusterSettings", [])
    _, alarm = _alarm_on(t, "ECS/ContainerInsights", "RunningTaskCount", {
        "ClusterName": _ref(cluster), "ServiceName": {"Fn::GetAtt": [service, "Name"]}})
    assert alarm["ComparisonOperator"] == "LessThanThreshold" and alarm["Threshold"] == _ref("MinCount")
    assert alarm["TreatMissingData"] == "breaching", "no task reporting is as bad as too few"
    # The proxy alarms are blind without its metric lines: one alarm watches that they arrive.
    _, alarm = _alarm_on(t, PROXY_NAMESPACE, "ConnectionsActive", {})
    assert alarm["Statistic"] == "SampleCount" and alarm["TreatMissingData"] == "breaching"
    _, alarm = _alarm_on(t, PROXY_NAMESPACE, "LogLinesDropped", {})
    assert alarm["Threshold"] == 0 and alarm["ComparisonOperator"] == "GreaterThanThreshold"


def check_alarm_topic(t: Template) -> None:
    assert t["Parameters"].get("AlarmTopicArn", {}).get("Default") == "", "alarms need a topic (parameter)"
    assert t["Conditions"]["CreateAlarmTopic"] == {
        "Fn::Equals": [_ref("AlarmTopicArn"), ""]}
    assert t["Resources"]["AlarmTopic"]["Condition"] == "CreateAlarmTopic"
    _, policy = _one(t, "AWS::SNS::TopicPolicy")
    assert policy["Topics"] == [_ref("AlarmTopic")]
    publishers = {}
    for s in policy["PolicyDocument"]["Statement"]:
        assert s["Effect"] == "Allow" and [a.lower() for a in _as_list(s["Action"])] == ["sns:publish"], s
        assert s["Resource"] == _ref("AlarmTopic"), s
        publishers[s["Principal"]["Service"]] = s.get("Condition")
    # A topic policy replaces the default: exactly the two services that publish here, CloudWatch from this account.
    assert set(publishers) == {"cloudwatch.amazonaws.com", "vpce.amazonaws.com"}
    assert publishers["cloudwatch.amazonaws.com"] == {"StringEquals": {"aws:SourceAccount": _ref("AWS::AccountId")}}
    _, notification = _one(t, "AWS::EC2::VPCEndpointConnectionNotification")
    service, _ = _one(t, "AWS::EC2::VPCEndpointService")
    assert notification["ServiceId"] == _ref(service) and notification["ConnectionNotificationArn"] == ALARM_TOPIC
    assert "Connect" in notification["ConnectionEvents"], "a pending partner endpoint must be announced"


def check_endpoint_service(t: Template) -> None:
    name, svc = _one(t, "AWS::EC2::VPCEndpointService")
    nlb, _ = _one(t, "AWS::ElasticLoadBalancingV2::LoadBalancer")
    assert svc.get("AcceptanceRequired") is True
    assert svc.get("NetworkLoadBalancerArns") == [_ref(nlb)]
    _, perms = _one(t, "AWS::EC2::VPCEndpointServicePermissions")
    assert perms.get("ServiceId") == _ref(name) and perms.get("AllowedPrincipals") == _ref("AllowedPrincipals")
    outputs = t.get("Outputs", {})
    assert {"EndpointServiceName", "NlbDnsName", "ApiUrl"} <= set(outputs)
    assert f"${{{name}}}" in outputs["EndpointServiceName"]["Value"]["Fn::Sub"]


def check_consumer(t: Template) -> None:
    _, ep = _one(t, "AWS::EC2::VPCEndpoint")
    assert ep.get("VpcEndpointType") == "Interface" and ep.get("PrivateDnsEnabled") is False
    assert ep.get("ServiceName") == _ref("ServiceName") and "ServiceName" in t["Parameters"]
    (ep_sg,) = [g["Ref"] for g in ep["SecurityGroupIds"]]
    ingress = [p for _, p in _of_type(t, "AWS::EC2::SecurityGroupIngress") if p["GroupId"] == _ref(ep_sg)]
    assert ingress and all((p["FromPort"], p["ToPort"]) == (443, 443) for p in ingress)
    egress = [e for _, p in _of_type(t, "AWS::EC2::SecurityGroup") for e in p.get("SecurityGroupEgress", [])
              if e.get("DestinationSecurityGroupId") == _ref(ep_sg)]
    assert [(e["FromPort"], e["ToPort"]) for e in egress] == [(443, 443)], "clients need HTTPS egress"
    assert "EndpointDnsName" in t.get("Outputs", {})


def check_emf_feeds_the_alarms(t: Template) -> None:
    """The task writes EMF lines, once a minute, in the namespace every alarm on the proxy's own metrics reads."""
    env = _env(t)
    assert env.get("MTLS_PROXY_METRICS_EMF") == "true", "alarms on proxy metrics need [metrics] emf = true"
    assert float(env.get("MTLS_PROXY_METRICS_INTERVAL", "60")) == 60, "one emission per CloudWatch minute"
    namespace = env.get("MTLS_PROXY_METRICS_NAMESPACE", "mtls-proxy")

    def namespaces(node: Any) -> list[Any]:
        if isinstance(node, dict):
            return [*([node["Namespace"]] if "Namespace" in node else []), *(x for v in node.values()
                                                                            for x in namespaces(v))]
        if isinstance(node, list):
            return [x for v in node for x in namespaces(v)]
        return []

    read = [n for _, p in _of_type(t, "AWS::CloudWatch::Alarm") for n in namespaces(p)
            if not (isinstance(n, str) and n.split("/")[0] in ("AWS", "ECS"))]  # AWS-owned: AWS/*, ECS/ContainerInsights
    assert read and all(n == namespace for n in read), (namespace, [n for n in read if n != namespace])


PROVIDER_CHECKS = [check_target_group, check_listener, check_load_balancer, check_security_groups,
                   check_security_group_rules_described, check_task_egress, check_private_api,
                   check_execute_api_endpoint_policy, check_timeouts_follow_integration, check_drain_budget,
                   check_ports, check_sources_are_polled, check_task_role_least_privilege,
                   check_execution_role_reads_no_secrets, check_config_bucket, check_first_deploy_without_tasks,
                   check_container_hardening, check_log_groups, check_access_log_delivery,
                   check_stage_access_logs, check_service, check_no_desired_count, check_scaling_can_reach_target,
                   check_fargate_sizes, check_subnets, check_alarms, check_alarm_topic, check_endpoint_service,
                   check_emf_feeds_the_alarms]


# --- breakages: each must make its check fail ----------------------------------------------------------------------
def _props(t: Template, name: str) -> dict[str, Any]:
    return t["Resources"][name]["Properties"]


def _tg_attr(key: str, value: str) -> Callable[[Template], None]:
    def mutate(t: Template) -> None:
        for a in _props(t, "TargetGroup")["TargetGroupAttributes"]:
            if a["Key"] == key:
                a["Value"] = value
    return mutate


def _set(name: str, key: str, value: Any) -> Callable[[Template], None]:
    return lambda t: _props(t, name).__setitem__(key, value)


def _drop(name: str, key: str) -> Callable[[Template], None]:
    return lambda t: _props(t, name).pop(key)


def _set_env(name: str, value: Any) -> Callable[[Template], None]:
    def mutate(t: Template) -> None:
        for e in _items(_container(t)["Environment"]):
            if e["Name"] == name:
                e["Value"] = value
    return mutate


def _set_container(key: str, value: Any) -> Callable[[Template], None]:
    return lambda t: _container(t).__setitem__(key, value)


def _set_row(key: str, field: str, value: Any) -> Callable[[Template], None]:
    return lambda t: t["Mappings"]["DrainTiming"][key].__setitem__(field, value)


def _policy(t: Template) -> list[dict[str, Any]]:
    return _props(t, "RestApi")["Policy"]["Statement"]


def _task_statement(t: Template, sid: str) -> dict[str, Any]:
    doc = _props(t, "TaskRole")["Policies"][0]["PolicyDocument"]
    return next(s for s in _items(doc["Statement"]) if s.get("Sid") == sid)


def _add_task_statement(statement: dict[str, Any]) -> Callable[[Template], None]:
    return lambda t: _props(t, "TaskRole")["Policies"][0]["PolicyDocument"]["Statement"].append(statement)


def _unconditional_kms(t: Template) -> None:
    statements = _props(t, "TaskRole")["Policies"][0]["PolicyDocument"]["Statement"]
    for i, s in enumerate(statements):
        if isinstance(s, dict) and "Fn::If" in s and s["Fn::If"][0] == "HasKmsKey":
            statements[i] = s["Fn::If"][1]


def _bucket_props(t: Template) -> dict[str, Any]:
    return _props(t, "ConfigBucket")


def _bucket_sse(t: Template) -> dict[str, Any]:
    return _bucket_props(t)["BucketEncryption"]["ServerSideEncryptionConfiguration"][0]  # type: ignore[no-any-return]


def _tls_statement(t: Template) -> dict[str, Any]:
    return _props(t, "ConfigBucketPolicy")["PolicyDocument"]["Statement"][0]  # type: ignore[no-any-return]


def _add_env(name: str, value: Any) -> Callable[[Template], None]:
    return lambda t: _container(t)["Environment"].append({"Name": name, "Value": value})


def _drop_env(name: str) -> Callable[[Template], None]:
    def mutate(t: Template) -> None:
        env = _container(t)["Environment"]
        env[:] = [e for e in env if not (isinstance(e, dict) and e.get("Name") == name)]
    return mutate


def _drop_condition(name: str) -> Callable[[Template], None]:
    return lambda t: t["Resources"][name].pop("Condition")


def _task_egress(t: Template) -> list[Any]:
    return _props(t, "TaskSecurityGroup")["SecurityGroupEgress"]  # type: ignore[no-any-return]


def _open_egress_always(t: Template) -> None:
    _task_egress(t).append({"Description": "all", "IpProtocol": "tcp", "FromPort": 443, "ToPort": 443,
                            "CidrIp": "0.0.0.0/0"})


def _drop_rule(name: str) -> Callable[[Template], None]:
    return lambda t: t["Rules"].pop(name)


def _rule_allows(name: str, memory: str) -> Callable[[Template], None]:
    return lambda t: t["Rules"][name]["Assertions"][0]["Assert"]["Fn::Contains"][0].append(memory)


def _alarm_prop(name: str, key: str, value: Any) -> Callable[[Template], None]:
    return lambda t: _props(t, name).__setitem__(key, value)


def _drop_resource(name: str) -> Callable[[Template], None]:
    return lambda t: t["Resources"].pop(name)


def _drop_handshake_reason(t: Template) -> None:
    metrics = _props(t, "HandshakeFailuresAlarm")["Metrics"]
    metrics[:] = [q for q in metrics if q["Id"] != "revoked"]


def _topic_statement(service: str) -> Callable[[Template], None]:
    def mutate(t: Template) -> None:
        doc = _props(t, "AlarmTopicPolicy")["PolicyDocument"]
        doc["Statement"] = [s for s in doc["Statement"] if s["Principal"]["Service"] != service]
    return mutate


BREAKAGES = [
    pytest.param(check_target_group, _tg_attr("proxy_protocol_v2.enabled", "false"), id="proxy-protocol-off"),
    pytest.param(check_target_group, lambda t: _props(t, "TargetGroup")["TargetGroupAttributes"][0].__setitem__(
        "Key", "proxy_protocol.enabled"), id="attribute-key-typo"),
    pytest.param(check_target_group, _tg_attr("deregistration_delay.timeout_seconds", "300"), id="default-delay"),
    pytest.param(check_target_group, _tg_attr("deregistration_delay.connection_termination.enabled", "true"),
                 id="nlb-resets-draining-connections"),
    pytest.param(check_target_group, _set("TargetGroup", "TargetType", "instance"), id="target-type-instance"),
    pytest.param(check_target_group, _set("TargetGroup", "Protocol", "TLS"), id="target-protocol-tls"),
    pytest.param(check_target_group, _set("TargetGroup", "HealthCheckProtocol", "TCP"), id="tcp-health-check"),
    pytest.param(check_target_group, _set("TargetGroup", "HealthCheckPath", "/healthz"), id="liveness-as-readiness"),
    pytest.param(check_target_group, _set("TargetGroup", "HealthCheckPort", "traffic-port"), id="hc-on-tls-port"),
    pytest.param(check_listener, _set("Listener", "Protocol", "TLS"), id="listener-terminates-tls"),
    pytest.param(check_listener, _set("Listener", "Port", 8443), id="listener-port"),
    pytest.param(check_load_balancer, _set("LoadBalancer", "Scheme", "internet-facing"), id="public-nlb"),
    pytest.param(check_security_groups, _set("TaskIngressTlsFromNlb", "SourceSecurityGroupId", None),
                 id="task-ingress-not-from-nlb"),
    pytest.param(check_security_groups, _set("NlbSecurityGroup", "SecurityGroupIngress",
                                             [{"IpProtocol": "tcp", "FromPort": 443, "ToPort": 443,
                                               "CidrIp": "10.0.0.0/8"}]), id="nlb-open-inside-vpc"),
    pytest.param(check_security_groups, _set("ExecuteApiEndpointIngressFromTasks", "SourceSecurityGroupId", None),
                 id="execute-api-endpoint-open"),
    pytest.param(check_security_group_rules_described, lambda t: _task_egress(t)[1]["Fn::If"][2].pop("Description"),
                 id="nat-rule-undescribed"),
    pytest.param(check_task_egress, _open_egress_always, id="egress-anywhere-in-endpoints-mode"),
    pytest.param(check_task_egress, lambda t: _task_egress(t).pop(2), id="no-s3-for-image-layers"),
    pytest.param(check_task_egress, _drop_rule("EndpointsEgressNeedsBoth"), id="endpoints-mode-without-inputs"),
    pytest.param(check_task_egress, _drop_resource("EndpointsIngressFromTasks"), id="endpoints-group-not-opened"),
    pytest.param(check_task_egress, lambda t: t["Parameters"]["EgressMode"].__setitem__("Default", "nat"),
                 id="open-egress-by-default"),
    pytest.param(check_private_api, lambda t: _policy(t).pop(0), id="no-deny"),
    pytest.param(check_private_api, lambda t: _policy(t)[0]["Condition"].__setitem__(
        "StringEquals", _policy(t)[0]["Condition"].pop("StringNotEquals")), id="deny-string-equals"),
    pytest.param(check_private_api, lambda t: _policy(t)[0]["Condition"]["StringNotEquals"].__setitem__(
        "aws:SourceVpce", "vpce-0123456789abcdef0"), id="deny-other-endpoint"),
    pytest.param(check_private_api, lambda t: _policy(t).pop(1), id="no-allow"),
    pytest.param(check_private_api, lambda t: _props(t, "RestApi")["EndpointConfiguration"].__setitem__(
        "Types", ["REGIONAL"]), id="regional-api"),
    pytest.param(check_execute_api_endpoint_policy, _drop("ExecuteApiEndpoint", "PolicyDocument"),
                 id="no-endpoint-policy"),
    pytest.param(check_execute_api_endpoint_policy, lambda t: _props(t, "ExecuteApiEndpoint")["PolicyDocument"][
        "Statement"][0].__setitem__("Resource", "*"), id="endpoint-policy-any-api"),
    pytest.param(check_execute_api_endpoint_policy, lambda t: _props(t, "ExecuteApiEndpoint")["PolicyDocument"][
        "Statement"][0].__setitem__("Action", "execute-api:*"), id="endpoint-policy-any-action"),
    pytest.param(check_timeouts_follow_integration, _set_env("MTLS_PROXY_UPSTREAM_READ_TIMEOUT", "30"),
                 id="read-timeout-fixed"),
    pytest.param(check_timeouts_follow_integration, _set_row("45", "ReadTimeout", "45"), id="read-equals-integration"),
    pytest.param(check_timeouts_follow_integration, _set_row("60", "ShutdownTimeout", "40"), id="drain-shorter"),
    pytest.param(check_timeouts_follow_integration, _set_row("90", "IntegrationMillis", 29000), id="millis-mismatch"),
    pytest.param(check_timeouts_follow_integration, lambda t: _props(t, "RootGetMethod")["Integration"].pop(
        "TimeoutInMillis"), id="integration-timeout-default"),
    pytest.param(check_drain_budget, _set_row("29", "StopTimeout", 37), id="sigkill-during-supervisor-grace"),
    pytest.param(check_drain_budget, _set_row("90", "StopTimeout", 180), id="stop-timeout-over-fargate-max"),
    pytest.param(check_drain_budget, _set_row("45", "ShutdownTimeout", "56"), id="drain-too-long"),
    pytest.param(check_ports, _set_env("MTLS_PROXY_SERVER_LISTEN", "0.0.0.0:9443"), id="listen-port-mismatch"),
    pytest.param(check_ports, _set_env("MTLS_PROXY_ADMIN_LISTEN", "127.0.0.1:9100"), id="admin-on-loopback"),
    pytest.param(check_ports, lambda t: _container(t)["PortMappings"].pop(), id="admin-port-not-mapped"),
    pytest.param(check_ports, lambda t: _props(t, "Service")["LoadBalancers"][0].__setitem__("ContainerPort", 9100),
                 id="service-lb-port"),
    # sources: read by the proxy, polled, nothing injected or fixed in the task definition
    pytest.param(check_sources_are_polled, _set_env("MTLS_PROXY_SERVER_CERT", "env:SERVER_CERT_PEM"),
                 id="cert-from-env"),
    pytest.param(check_sources_are_polled, lambda t: _container(t).__setitem__(
        "Secrets", [{"Name": "SERVER_KEY_PEM", "ValueFrom": _ref("ServerKeySecretArn")}]), id="ecs-injected-secret"),
    pytest.param(check_sources_are_polled, _set_env("MTLS_PROXY_SERVER_KEY", {"Fn::Sub": "secretsmanager:${ServerKeySecretArn}"}),
                 id="key-from-empty-parameter"),
    pytest.param(check_sources_are_polled, _drop_env("MTLS_PROXY_ALLOW_FROM"), id="no-rules-document"),
    pytest.param(check_sources_are_polled, _add_env("MTLS_PROXY_ALLOW", "[]"), id="rules-in-task-definition"),
    pytest.param(check_sources_are_polled, _set_env("MTLS_PROXY_SERVER_CRL", {"Fn::Sub": [
        "s3://${Bucket}/pki/other.crl", {"Bucket": {"Fn::If": ["CreateConfigBucket", _ref("ConfigBucket"),
                                                                _ref("ConfigBucketName")]}}]}), id="crl-fixed-key"),
    pytest.param(check_sources_are_polled, _set_env("MTLS_PROXY_ALLOW_FROM", {"Fn::Sub": "s3://${ConfigBucket}/r.toml"}),
                 id="rules-ignore-existing-bucket"),
    pytest.param(check_sources_are_polled, _drop_env("MTLS_PROXY_SERVER_RELOAD_INTERVAL"), id="default-interval"),
    pytest.param(check_sources_are_polled, lambda t: t["Parameters"]["ReloadInterval"].__setitem__("Default", 3600),
                 id="interval-an-hour"),
    pytest.param(check_sources_are_polled, lambda t: t["Parameters"]["ReloadInterval"].__setitem__("MinValue", 0),
                 id="interval-may-be-0"),
    # task role: exact ARNs, the calls the sources make, KMS only for a given key and through its service
    pytest.param(check_task_role_least_privilege, lambda t: _task_statement(t, "ReadConfigObjects").__setitem__(
        "Resource", "*"), id="objects-star"),
    pytest.param(check_task_role_least_privilege, lambda t: _task_statement(t, "ReadConfigObjects").__setitem__(
        "Resource", {"Fn::Sub": "arn:${AWS::Partition}:s3:::${ConfigBucket}/*"}), id="whole-bucket"),
    pytest.param(check_task_role_least_privilege, lambda t: _task_statement(t, "ReadConfigObjects").__setitem__(
        "Action", ["s3:GetObject", "s3:PutObject"]), id="task-may-write"),
    pytest.param(check_task_role_least_privilege, lambda t: _task_statement(t, "ReadConfigObjects")["Resource"].pop(),
                 id="crl-not-readable"),
    pytest.param(check_task_role_least_privilege, _add_task_statement({
        "Effect": "Allow", "Action": "s3:ListBucket", "Resource": {"Fn::GetAtt": ["ConfigBucket", "Arn"]}}),
        id="list-bucket"),
    pytest.param(check_task_role_least_privilege, lambda t: _task_statement(t, "ReadProxySecrets").__setitem__(
        "Resource", "*"), id="secrets-star"),
    pytest.param(check_task_role_least_privilege, lambda t: _task_statement(t, "ReadProxySecrets").__setitem__(
        "Action", "secretsmanager:GetSecretValue"), id="no-describe-secret"),
    pytest.param(check_task_role_least_privilege, lambda t: _task_statement(t, "ReadProxySecrets")["Resource"].pop(),
                 id="client-ca-not-readable"),
    pytest.param(check_task_role_least_privilege, _add_task_statement({
        "Effect": "Allow", "Action": "secretsmanager:*", "Resource": "*"}), id="extra-secrets-statement"),
    pytest.param(check_task_role_least_privilege, _unconditional_kms, id="kms-without-a-key"),
    pytest.param(check_task_role_least_privilege, lambda t: _props(t, "TaskRole")["Policies"][0]["PolicyDocument"][
        "Statement"][2]["Fn::If"][1].pop("Condition"), id="kms-any-service"),
    pytest.param(check_task_role_least_privilege, lambda t: _props(t, "TaskRole")["Policies"][0]["PolicyDocument"][
        "Statement"][3]["Fn::If"][1]["Condition"]["StringEquals"].__setitem__(
        "kms:ViaService", {"Fn::Sub": "secretsmanager.${AWS::Region}.${AWS::URLSuffix}"}), id="kms-wrong-service"),
    pytest.param(check_task_role_least_privilege, lambda t: _props(t, "TaskRole").__setitem__(
        "ManagedPolicyArns", ["arn:aws:iam::aws:policy/AmazonS3ReadOnlyAccess"]), id="task-managed-policy"),
    # execution role: no secrets any more
    pytest.param(check_execution_role_reads_no_secrets, lambda t: _props(t, "TaskExecutionRole")["Policies"].append(
        {"PolicyName": "x", "PolicyDocument": {"Statement": [{"Effect": "Allow", "Action": "secretsmanager:GetSecretValue",
                                                             "Resource": _ref("ServerCertSecretArn")}]}}),
        id="execution-role-reads-secrets"),
    pytest.param(check_execution_role_reads_no_secrets, lambda t: _props(t, "TaskExecutionRole").__setitem__(
        "ManagedPolicyArns", ["arn:aws:iam::aws:policy/SecretsManagerReadWrite"]), id="managed-policy"),
    # the config bucket
    pytest.param(check_config_bucket, lambda t: _bucket_props(t)["VersioningConfiguration"].__setitem__(
        "Status", "Suspended"), id="versioning-suspended"),
    pytest.param(check_config_bucket, lambda t: _bucket_props(t).pop("VersioningConfiguration"), id="unversioned"),
    pytest.param(check_config_bucket, lambda t: _bucket_props(t)["PublicAccessBlockConfiguration"].__setitem__(
        "BlockPublicPolicy", False), id="public-policy-allowed"),
    pytest.param(check_config_bucket, lambda t: _bucket_props(t)["PublicAccessBlockConfiguration"].pop(
        "RestrictPublicBuckets"), id="public-access-block-incomplete"),
    pytest.param(check_config_bucket, lambda t: _bucket_props(t).pop("BucketEncryption"), id="no-default-encryption"),
    pytest.param(check_config_bucket, lambda t: _bucket_sse(t).__setitem__(
        "ServerSideEncryptionByDefault", {"SSEAlgorithm": "AES256"}), id="customer-key-ignored"),
    pytest.param(check_config_bucket, lambda t: _tls_statement(t)["Condition"]["Bool"].__setitem__(
        "aws:SecureTransport", "true"), id="denies-tls-instead"),
    pytest.param(check_config_bucket, lambda t: _tls_statement(t).__setitem__(
        "Resource", {"Fn::GetAtt": ["ConfigBucket", "Arn"]}), id="tls-only-for-the-bucket-not-objects"),
    pytest.param(check_config_bucket, _drop_resource("ConfigBucketPolicy"), id="no-bucket-policy"),
    pytest.param(check_config_bucket, lambda t: t["Resources"]["ConfigBucket"].__setitem__("DeletionPolicy", "Delete"),
                 id="bucket-deleted-with-stack"),
    pytest.param(check_config_bucket, _drop_condition("ConfigBucketPolicy"),
                 id="policy-on-existing-bucket"),
    pytest.param(check_config_bucket, lambda t: t["Parameters"]["RulesObjectKey"].__setitem__(
        "AllowedPattern", "^.+$"), id="key-may-be-wildcard"),
    # first deploy
    pytest.param(check_first_deploy_without_tasks, _drop_condition("Service"), id="service-always"),
    pytest.param(check_first_deploy_without_tasks, _drop_condition("RunningTasksAlarm"), id="alarm-without-tasks"),
    pytest.param(check_first_deploy_without_tasks, lambda t: t["Resources"]["ConfigBucket"].__setitem__(
        "Condition", "StartTasks"), id="bucket-only-with-tasks"),
    pytest.param(check_container_hardening, _set_container("ReadonlyRootFilesystem", False), id="writable-root"),
    pytest.param(check_container_hardening, lambda t: _container(t)["LinuxParameters"].pop("Tmpfs"), id="no-tmp"),
    pytest.param(check_container_hardening, _set_container("User", "root"), id="root-user"),
    pytest.param(check_container_hardening, lambda t: t["Parameters"]["ContainerUser"].__setitem__(
        "AllowedPattern", "^.*$"), id="user-pattern-allows-root"),
    pytest.param(check_log_groups, lambda t: t["Resources"]["LogGroup"].__setitem__("DeletionPolicy", "Delete"),
                 id="log-group-deleted-with-stack"),
    pytest.param(check_log_groups, lambda t: t["Resources"]["ApiAccessLogGroup"].pop("UpdateReplacePolicy"),
                 id="log-group-lost-on-replacement"),
    pytest.param(check_log_groups, _drop("LogGroup", "RetentionInDays"), id="no-retention"),
    pytest.param(check_log_groups, _drop("ApiAccessLogGroup", "KmsKeyId"), id="no-kms-option"),
    pytest.param(check_access_log_delivery, lambda t: _container(t)["LogConfiguration"]["Options"].__setitem__(
        "mode", "non-blocking"), id="awslogs-non-blocking"),
    pytest.param(check_access_log_delivery, lambda t: _container(t)["LogConfiguration"]["Options"].pop("mode"),
                 id="awslogs-mode-default"),
    pytest.param(check_stage_access_logs, _drop("ApiStage", "AccessLogSetting"), id="no-stage-access-log"),
    pytest.param(check_stage_access_logs, lambda t: t["Resources"]["ApiStage"].pop("DependsOn"),
                 id="stage-before-account-role"),
    pytest.param(check_stage_access_logs, lambda t: t["Resources"]["ApiGatewayCloudWatchRole"].pop("DeletionPolicy"),
                 id="account-role-deleted-with-stack"),
    pytest.param(check_service, _set("Service", "LaunchType", "EC2"), id="launch-type-ec2"),
    pytest.param(check_service, lambda t: _props(t, "Service")["NetworkConfiguration"]["AwsvpcConfiguration"]
                 .__setitem__("AssignPublicIp", "ENABLED"), id="public-ip"),
    pytest.param(check_service, lambda t: t["Resources"]["Service"].pop("DependsOn"), id="no-listener-dependency"),
    pytest.param(check_no_desired_count, _set("Service", "DesiredCount", 2), id="desired-count"),
    pytest.param(check_scaling_can_reach_target, _set_env("MTLS_PROXY_SERVER_WORKERS", "1"), id="one-worker"),
    pytest.param(check_emf_feeds_the_alarms, _set_env("MTLS_PROXY_METRICS_EMF", "false"), id="emf-off"),
    pytest.param(check_emf_feeds_the_alarms, _set_env("MTLS_PROXY_METRICS_NAMESPACE", "other"), id="emf-namespace"),
    pytest.param(check_scaling_can_reach_target, lambda t: t["Mappings"]["TaskSize"]["4096"].__setitem__(
        "Workers", "2"), id="half-the-vcpus"),
    pytest.param(check_scaling_can_reach_target, lambda t: t["Mappings"]["TaskSize"]["256"].__setitem__(
        "Workers", "4"), id="more-workers-than-vcpus"),
    pytest.param(check_fargate_sizes, _drop_rule("Cpu256Memory"), id="cpu256-mem4096-accepted"),
    pytest.param(check_fargate_sizes, _rule_allows("Cpu2048Memory", "2048"), id="cpu2048-mem2048-accepted"),
    pytest.param(check_fargate_sizes, lambda t: t["Rules"]["Cpu512Memory"]["Assertions"][0]["Assert"][
        "Fn::Contains"][0].remove("4096"), id="valid-pair-refused"),
    pytest.param(check_subnets, lambda t: t["Parameters"]["SubnetIds"].pop("AllowedPattern"), id="one-subnet"),
    pytest.param(check_subnets, lambda t: t["Parameters"]["SubnetIds"].__setitem__(
        "AllowedPattern", "^subnet-[0-9a-f]+(,subnet-[0-9a-f]+)*$"), id="pattern-allows-one"),
    pytest.param(check_alarms, _drop_resource("ClientCaExpiryAlarm"), id="no-client-ca-alarm"),
    pytest.param(check_alarms, _alarm_prop("ServerCertExpiryAlarm", "Threshold", 3), id="cert-threshold-fixed"),
    pytest.param(check_alarms, _drop_handshake_reason, id="handshake-reason-unwatched"),
    pytest.param(check_alarms, _drop_resource("Api5xxRateAlarm"), id="no-api-5xx-alarm"),
    pytest.param(check_alarms, _drop_resource("UnhealthyHostsAlarm"), id="no-unhealthy-alarm"),
    pytest.param(check_alarms, _alarm_prop("RunningTasksAlarm", "Threshold", 1), id="running-tasks-below-1"),
    pytest.param(check_alarms, _alarm_prop("UpstreamErrorsAlarm", "AlarmActions", []), id="alarm-notifies-nobody"),
    pytest.param(check_alarms, lambda t: _props(t, "Proxy5xxRateAlarm")["Metrics"][0]["MetricStat"]["Metric"]
                 .__setitem__("Namespace", "mtls-proxy"), id="alarm-on-other-namespace"),
    pytest.param(check_alarm_topic, _topic_statement("vpce.amazonaws.com"), id="vpce-cannot-publish"),
    pytest.param(check_alarm_topic, _topic_statement("cloudwatch.amazonaws.com"), id="cloudwatch-cannot-publish"),
    pytest.param(check_alarm_topic, _set("EndpointConnectionNotification", "ConnectionEvents", ["Accept"]),
                 id="pending-endpoints-unannounced"),
    pytest.param(check_endpoint_service, _set("EndpointService", "AcceptanceRequired", False), id="auto-accept"),
    pytest.param(check_endpoint_service, _set("EndpointServicePermissions", "AllowedPrincipals", ["*"]),
                 id="everyone-allowed"),
]

CONSUMER_BREAKAGES = [
    pytest.param(_set("Endpoint", "VpcEndpointType", "Gateway"), id="gateway-endpoint"),
    pytest.param(_set("Endpoint", "ServiceName", "com.amazonaws.vpce.eu-west-1.vpce-svc-0123"), id="hardcoded"),
    pytest.param(_set("Endpoint", "PrivateDnsEnabled", True), id="private-dns"),
    pytest.param(lambda t: _props(t, "ClientSecurityGroup").pop("SecurityGroupEgress"), id="no-client-egress"),
]


# --- tests ----------------------------------------------------------------------------------------------------------
def _cfn_lint(path: Path) -> subprocess.CompletedProcess[str]:
    assert CFN_LINT.exists(), f"cfn-lint is not installed in the venv ({CFN_LINT})"
    return subprocess.run([str(CFN_LINT), "--", str(path)], capture_output=True, text=True, timeout=55, check=False)


@pytest.mark.parametrize("path", [PROVIDER, CONSUMER], ids=lambda p: p.name)
def test_cfn_lint_passes(path: Path) -> None:
    result = _cfn_lint(path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_cfn_lint_rejects_a_broken_template(tmp_path: Path) -> None:
    # Proves the lint test can fail: an invalid enum value must be reported with a non-zero exit.
    broken = tmp_path / "provider.yaml"
    broken.write_text(PROVIDER.read_text().replace("      Protocol: TCP\n", "      Protocol: TCPX\n", 1))
    result = _cfn_lint(broken)
    assert result.returncode != 0 and "TCPX" in result.stdout


@pytest.mark.parametrize("check", PROVIDER_CHECKS, ids=lambda c: c.__name__)
def test_provider_property_holds(provider: Template, check: Callable[[Template], None]) -> None:
    check(provider)


@pytest.mark.parametrize(("check", "mutate"), BREAKAGES)
def test_provider_check_detects_breakage(provider: Template, check: Callable[[Template], None],
                                         mutate: Callable[[Template], None]) -> None:
    broken = copy.deepcopy(provider)
    mutate(broken)
    with pytest.raises(AssertionError):
        check(broken)


def test_consumer_property_holds(consumer: Template) -> None:
    check_consumer(consumer)


@pytest.mark.parametrize("mutate", CONSUMER_BREAKAGES)
def test_consumer_check_detects_breakage(consumer: Template, mutate: Callable[[Template], None]) -> None:
    broken = copy.deepcopy(consumer)
    mutate(broken)
    with pytest.raises(AssertionError):
        check_consumer(broken)


def _checkov_skips(t: Template) -> list[tuple[str, str, str]]:
    return [(name, skip.get("id", ""), str(skip.get("comment", "")))
            for name, resource in t["Resources"].items()
            for skip in resource.get("Metadata", {}).get("checkov", {}).get("skip", [])]


def check_checkov_suppressions(t: Template, readme: str) -> None:
    """checkov is a documented manual step (deploy/README.md): every finding it would still report is suppressed
    next to its resource with a reason, and listed in the README's table."""
    for resource, check_id, comment in _checkov_skips(t):
        assert re.fullmatch(r"CKV_AWS_\d+", check_id), (resource, check_id)
        assert len(comment.split()) >= 5, f"{resource}: suppression of {check_id} without a reason"
        assert re.search(rf"\|\s*`{check_id}`\s*\|\s*`{resource}`\s*\|", readme), (
            f"{check_id} on {resource} is not in deploy/README.md's checkov table")


@pytest.mark.parametrize("path", [PROVIDER, CONSUMER], ids=lambda p: p.name)
def test_every_checkov_suppression_is_explained(path: Path) -> None:
    check_checkov_suppressions(_load(path), README.read_text())


@pytest.mark.parametrize("change", ["short-reason", "not-in-readme"])
def test_checkov_suppression_check_detects_breakage(provider: Template, change: str) -> None:
    broken, readme = copy.deepcopy(provider), README.read_text()
    (resource, check_id, _), *_ = _checkov_skips(broken)
    if change == "short-reason":
        broken["Resources"][resource]["Metadata"]["checkov"]["skip"][0]["comment"] = "because"
    else:
        readme = readme.replace(f"`{check_id}`", "`CKV_AWS_0`")
    with pytest.raises(AssertionError):
        check_checkov_suppressions(broken, readme)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_task_environment_is_a_valid_proxy_config(provider: Template, scenario: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # The loader rejects unknown MTLS_PROXY_* names, bad values and sources it cannot parse: the task definition
    # must describe a configuration the proxy actually starts with. The rules document is the one source the
    # loader reads itself; here it is answered from SAMPLE_RULES, after checking where it would be read from.
    d = Deployment(provider, **SCENARIOS[scenario])
    environ = d.env()
    read_from = []

    def rules_from_s3(src: Any, env: Any, c: Any) -> list[Any]:
        read_from.append(str(src))
        return copy.deepcopy(SAMPLE_RULES)

    monkeypatch.setattr(rules_doc, "read_rules_document", rules_from_s3)
    cfg = load(None, environ)
    assert read_from == [f"s3://{d.bucket}/{d.params['RulesObjectKey']}"]
    tls_port, admin_port = _tg_ports(provider)
    assert (cfg.server.listen.port, cfg.admin.listen.port) == (tls_port, admin_port)
    assert cfg.server.proxy_protocol is True
    assert cfg.server.reload_interval == float(d.params["ReloadInterval"])
    assert cfg.server.cert.uri == f"secretsmanager:{CERT_ARN}"
    assert cfg.server.key.uri == f"secretsmanager:{d.params['ServerKeySecretArn'] or CERT_ARN}"
    assert cfg.server.client_ca.uri == f"secretsmanager:{CA_ARN}"
    assert (cfg.server.crl.uri if cfg.server.crl else None) == (
        f"s3://{d.bucket}/{d.params['CrlObjectKey']}" if d.params["CrlObjectKey"] else None)
    assert cfg.allow_from is not None and cfg.allow_from.location.kind == "s3"
    stop = float(d.value(_container(provider)["StopTimeout"]))
    assert cfg.upstream.read_timeout > 29 and cfg.server.shutdown_timeout >= cfg.upstream.read_timeout
    assert cfg.server.shutdown_timeout < stop
    assert cfg.server.workers == _workers(provider, provider["Parameters"]["TaskCpu"]["Default"])
    assert (cfg.upstream.host, cfg.upstream.base_path) == ("a1b2c3d4e5.execute-api.eu-west-1.amazonaws.com", "/v1")
    assert cfg.upstream.api_id == "a1b2c3d4e5"
    assert [r.source_vpce for r in cfg.allow] == [("vpce-0123456789abcdef0",)]
