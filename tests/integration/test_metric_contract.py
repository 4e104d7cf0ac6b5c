"""Every metric the deploy files use is really exported by the running gateway or TorchServe."""

import re
import urllib.request

import pytest

from service.client import SaliencyClient
from tests.deploy.metric_refs import EXTERNAL_METRICS, referenced_metrics

pytestmark = pytest.mark.integration
_TYPE = re.compile(r"^# TYPE (\S+) ", re.MULTILINE)


def families(url: str) -> set[str]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return set(_TYPE.findall(text))


def test_deploy_metrics_are_exported(gateway, torchserve, client: SaliencyClient, samples) -> None:  # type: ignore[no-untyped-def]
    # One call of each kind so that lazily created families exist.
    client.explain(samples[6][0], methods=["grad_cam"])
    client.predict(samples[6][0])
    live = families(gateway.metrics_url)
    live |= families(f"http://127.0.0.1:{torchserve.ports.metrics}/metrics")
    referenced = referenced_metrics()
    missing = {
        name: sorted(files)
        for name, files in referenced.items()
        if name not in live and name not in EXTERNAL_METRICS
    }
    assert not missing, f"referenced in deploy/ but exported by nobody: {missing}"
    assert {n for n in referenced if n.startswith("saliency_")} <= live
