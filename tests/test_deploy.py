"""Tests for deploy/: the CloudFormation templates that run mtls-proxy on ECS Fargate behind an NLB and PrivateLink.

Owns: linting both templates with the venv's cfn-lint, and asserting what cfn-lint cannot know: ports that must agree
across resources, the PROXY-protocol target group, the private API's resource policy, the drain timing, least
privilege on the secrets, the container hardening, and that the task definition's environment is a configuration
``proxy.config.load`` accepts.  Every check also runs against a deliberately broken copy of the template (the
BREAKAGES table), so a check that cannot fail is itself a failing test.

Must not: call AWS or the network; modify the templates.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cfnlint.decode import decode

from proxy.config import load

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
PROVIDER = DEPLOY / "provider.yaml"
CONSUMER = DEPLOY / "consumer.yaml"
CFN_LINT = Path(sys.executable).parent / "cfn-lint"

NO_VALUE = {"Ref": "AWS::NoValue"}
SECRET_ENV = {  # secret env var -> template parameter holding the secret's ARN
    "SERVER_CERT_PEM": "ServerCertSecretArn",
    "SERVER_KEY_PEM": "ServerKeySecretArn",
    "CLIENT_CA_PEM": "ClientCaSecretArn",
    "CLIENT_CRL_PEM": "ClientCrlSecretArn",
}
PEM_ENV = {  # proxy setting -> the secret env var it reads (``env:NAME``)
    "MTLS_PROXY_SERVER_CERT": "SERVER_CERT_PEM",
    "MTLS_PROXY_SERVER_KEY": "SERVER_KEY_PEM",
    "MTLS_PROXY_SERVER_CLIENT_CA": "CLIENT_CA_PEM",
    "MTLS_PROXY_SERVER_CRL": "CLIENT_CRL_PEM",
}
TG_ATTRIBUTE_KEYS = {
    "proxy_protocol_v2.enabled",
    "deregistration_delay.timeout_seconds",
    "deregistration_delay.connection_termination.enabled",
    "preserve_client_ip.enabled",
}
SAMPLE_ALLOW = '[{"name": "partner-a", "subject_cn": ["partner-a-client"], "source_vpce": ["vpce-0123456789abcdef0"]}]'

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
    _, svc = _one(t, "AWS::ECS::Service")
    (task_sg,) = [g["Ref"] for g in svc["NetworkConfiguration"]["AwsvpcConfiguration"]["SecurityGroups"]]
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
    ep_ingress = groups[ep_sg]["Properties"].get("SecurityGroupIngress", [])
    assert [(r["FromPort"], r["ToPort"], r.get("SourceSecurityGroupId")) for r in ep_ingress] == [
        (443, 443, _ref(task_sg))]


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


def check_drain_timing(t: Template) -> None:
    stop_timeout = _container(t).get("StopTimeout", 30)  # Fargate's default when absent
    shutdown = float(_env(t).get("MTLS_PROXY_SERVER_SHUTDOWN_TIMEOUT", "25"))  # the proxy's default
    assert shutdown < stop_timeout <= 120, f"drain {shutdown}s must end before SIGKILL at {stop_timeout}s"


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


def check_secrets(t: Template) -> None:
    container, env = _container(t), _env(t)
    secrets = {s["Name"]: s["ValueFrom"] for s in _items(container.get("Secrets"))}
    assert secrets == {name: _ref(param) for name, param in SECRET_ENV.items()}
    assert {k: v for k, v in env.items() if str(v).startswith("env:")} == {
        setting: f"env:{name}" for setting, name in PEM_ENV.items()}
    _, td = _one(t, "AWS::ECS::TaskDefinition")
    role = t["Resources"][td["ExecutionRoleArn"]["Fn::GetAtt"][0]]["Properties"]
    assert "ManagedPolicyArns" not in role, "a managed policy could grant wider secret access"
    granted = []
    for s in _statements(role):
        actions = _as_list(s.get("Action"))
        if any(a == "*" or a.startswith(("secretsmanager:", "kms:")) for a in actions):
            resources = _as_list(s.get("Resource"))
            assert "*" not in resources, f"statement {s.get('Sid')} grants secret access on '*'"
            if any(a.startswith("secretsmanager:") or a == "*" for a in actions):
                assert actions == ["secretsmanager:GetSecretValue"], actions
                granted.extend(resources)
    assert sorted(map(json.dumps, granted)) == sorted(map(json.dumps, secrets.values()))
    task_role = t["Resources"][td["TaskRoleArn"]["Fn::GetAtt"][0]]["Properties"]
    assert not task_role.get("Policies") and not task_role.get("ManagedPolicyArns"), "task role must stay empty"


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
    logs = container.get("LogConfiguration", {})
    assert logs.get("LogDriver") == "awslogs"
    group, lg = _one(t, "AWS::Logs::LogGroup")
    assert logs["Options"].get("awslogs-group") == _ref(group) and lg.get("RetentionInDays")


def check_service(t: Template) -> None:
    name, svc = _one(t, "AWS::ECS::Service")
    _, td = _one(t, "AWS::ECS::TaskDefinition")
    assert svc.get("LaunchType") == "FARGATE" and "CapacityProviderStrategy" not in svc
    assert td.get("RequiresCompatibilities") == ["FARGATE"] and td.get("NetworkMode") == "awsvpc"
    vpc = svc.get("NetworkConfiguration", {}).get("AwsvpcConfiguration", {})
    assert vpc.get("AssignPublicIp") == "DISABLED" and vpc.get("Subnets") == _ref("SubnetIds")
    assert svc.get("DeploymentConfiguration", {}).get("DeploymentCircuitBreaker", {}).get("Enable") is True
    assert svc.get("HealthCheckGracePeriodSeconds", 0) > 0
    listener, _ = _one(t, "AWS::ElasticLoadBalancingV2::Listener")
    assert listener in _as_list(t["Resources"][name].get("DependsOn", []))
    _, target = _one(t, "AWS::ApplicationAutoScaling::ScalableTarget")
    assert f"${{{name}.Name}}" in target.get("ResourceId", {}).get("Fn::Sub", "")
    _, policy = _one(t, "AWS::ApplicationAutoScaling::ScalingPolicy")
    metric = policy["TargetTrackingScalingPolicyConfiguration"]["PredefinedMetricSpecification"]
    assert metric["PredefinedMetricType"] == "ECSServiceAverageCPUUtilization"


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


PROVIDER_CHECKS = [check_target_group, check_listener, check_load_balancer, check_security_groups,
                   check_private_api, check_drain_timing, check_ports, check_secrets, check_container_hardening,
                   check_service, check_endpoint_service]


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


def _set_env(name: str, value: str) -> Callable[[Template], None]:
    def mutate(t: Template) -> None:
        for e in _items(_container(t)["Environment"]):
            if e["Name"] == name:
                e["Value"] = value
    return mutate


def _set_container(key: str, value: Any) -> Callable[[Template], None]:
    return lambda t: _container(t).__setitem__(key, value)


def _policy(t: Template) -> list[dict[str, Any]]:
    return _props(t, "RestApi")["Policy"]["Statement"]


def _secret_statement(t: Template) -> dict[str, Any]:
    return next(s for s in _statements(_props(t, "TaskExecutionRole")) if s.get("Sid") == "ReadProxySecrets")


def _grant_all_secrets(t: Template) -> None:
    _props(t, "TaskExecutionRole")["Policies"][0]["PolicyDocument"]["Statement"].append(
        {"Effect": "Allow", "Action": "secretsmanager:*", "Resource": "*"})


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
    pytest.param(check_private_api, lambda t: _policy(t).pop(0), id="no-deny"),
    pytest.param(check_private_api, lambda t: _policy(t)[0]["Condition"].__setitem__(
        "StringEquals", _policy(t)[0]["Condition"].pop("StringNotEquals")), id="deny-string-equals"),
    pytest.param(check_private_api, lambda t: _policy(t)[0]["Condition"]["StringNotEquals"].__setitem__(
        "aws:SourceVpce", "vpce-0123456789abcdef0"), id="deny-other-endpoint"),
    pytest.param(check_private_api, lambda t: _policy(t).pop(1), id="no-allow"),
    pytest.param(check_private_api, lambda t: _props(t, "RestApi")["EndpointConfiguration"].__setitem__(
        "Types", ["REGIONAL"]), id="regional-api"),
    pytest.param(check_drain_timing, _set_container("StopTimeout", 20), id="sigkill-before-drain-ends"),
    pytest.param(check_drain_timing, _set_env("MTLS_PROXY_SERVER_SHUTDOWN_TIMEOUT", "30"), id="drain-too-long"),
    pytest.param(check_drain_timing, _set_container("StopTimeout", 300), id="stop-timeout-over-fargate-max"),
    pytest.param(check_ports, _set_env("MTLS_PROXY_SERVER_LISTEN", "0.0.0.0:9443"), id="listen-port-mismatch"),
    pytest.param(check_ports, _set_env("MTLS_PROXY_ADMIN_LISTEN", "127.0.0.1:9100"), id="admin-on-loopback"),
    pytest.param(check_ports, lambda t: _container(t)["PortMappings"].pop(), id="admin-port-not-mapped"),
    pytest.param(check_ports, lambda t: _props(t, "Service")["LoadBalancers"][0].__setitem__("ContainerPort", 9100),
                 id="service-lb-port"),
    pytest.param(check_secrets, lambda t: _secret_statement(t).__setitem__("Resource", "*"), id="secrets-star"),
    pytest.param(check_secrets, _grant_all_secrets, id="extra-secrets-statement"),
    pytest.param(check_secrets, lambda t: _props(t, "TaskExecutionRole").__setitem__(
        "ManagedPolicyArns", ["arn:aws:iam::aws:policy/SecretsManagerReadWrite"]), id="managed-policy"),
    pytest.param(check_secrets, _set_env("MTLS_PROXY_SERVER_KEY", "/etc/mtls-proxy/server.key"), id="key-not-env"),
    pytest.param(check_secrets, lambda t: _container(t)["Secrets"][0].__setitem__("ValueFrom", "arn:aws:x"),
                 id="secret-from-elsewhere"),
    pytest.param(check_container_hardening, _set_container("ReadonlyRootFilesystem", False), id="writable-root"),
    pytest.param(check_container_hardening, lambda t: _container(t)["LinuxParameters"].pop("Tmpfs"), id="no-tmp"),
    pytest.param(check_container_hardening, _set_container("User", "root"), id="root-user"),
    pytest.param(check_container_hardening, lambda t: t["Parameters"]["ContainerUser"].__setitem__(
        "AllowedPattern", "^.*$"), id="user-pattern-allows-root"),
    pytest.param(check_service, _set("Service", "LaunchType", "EC2"), id="launch-type-ec2"),
    pytest.param(check_service, lambda t: _props(t, "Service")["NetworkConfiguration"]["AwsvpcConfiguration"]
                 .__setitem__("AssignPublicIp", "ENABLED"), id="public-ip"),
    pytest.param(check_service, lambda t: t["Resources"]["Service"].pop("DependsOn"), id="no-listener-dependency"),
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


def _resolve(value: Any, t: Template, known: dict[str, str]) -> str:
    """A template value as the task would see it, with resource ids from ``known`` and parameters' defaults."""
    def lookup(name: str) -> str:
        if name in known:
            return known[name]
        return str(t["Parameters"][name]["Default"])
    if isinstance(value, str):
        return value
    if "Ref" in value:
        return lookup(value["Ref"])
    if "Fn::Sub" in value:
        return re.sub(r"\$\{([^}]+)\}", lambda m: lookup(m.group(1)), value["Fn::Sub"])
    raise AssertionError(f"cannot resolve {value!r}")


def test_task_environment_is_a_valid_proxy_config(provider: Template) -> None:
    # The loader rejects unknown MTLS_PROXY_* names, bad values and unset env:NAME sources: the task definition
    # must describe a configuration the proxy actually starts with (secrets injected, parameters at defaults).
    known = {"RestApi": "a1b2c3d4e5", "AWS::Region": "eu-west-1", "AWS::URLSuffix": "amazonaws.com",
             "AllowRules": SAMPLE_ALLOW}
    environ = {name: _resolve(v, provider, known) for name, v in _env(provider).items()}
    environ |= {s["Name"]: "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n"
                for s in _items(_container(provider)["Secrets"])}
    cfg = load(None, environ)
    tls_port, admin_port = _tg_ports(provider)
    assert (cfg.server.listen.port, cfg.admin.listen.port) == (tls_port, admin_port)
    assert cfg.server.proxy_protocol is True
    assert cfg.server.shutdown_timeout < _container(provider)["StopTimeout"]
    assert (cfg.upstream.host, cfg.upstream.base_path) == ("a1b2c3d4e5.execute-api.eu-west-1.amazonaws.com", "/v1")
    assert cfg.upstream.api_id == "a1b2c3d4e5"
    assert [r.source_vpce for r in cfg.allow] == [("vpce-0123456789abcdef0",)]
