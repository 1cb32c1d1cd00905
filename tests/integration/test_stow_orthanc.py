"""Results over DICOMweb: the dispatcher's STOW-RS sender stores into a real Orthanc through its DICOMweb plugin
(Debian orthanc-dicomweb), and retries while the URL is wrong."""

from __future__ import annotations

import pytest

from node.config import DestinationKind, NodeConfig
from node.db import create_engine_for, init_schema
from node.dispatch import Dispatcher
from node.senders import StowSender
from node.states import DeliveryState
from peers.orthanc import DICOMWEB_PLUGIN
from peers.process import wait_until
from tests.conftest import missing_peer
from tests.ctgen import write_ct_series

pytestmark = pytest.mark.integration


@pytest.fixture
def orthanc(orthanc_factory):
    if not DICOMWEB_PLUGIN.exists():
        missing_peer("orthanc-dicomweb is not installed (make test installs it when run as root)")
    return orthanc_factory()


def config_for(url: str, data_dir) -> NodeConfig:
    return NodeConfig.model_validate({
        "node": {"data_dir": str(data_dir)},
        "dispatch": {"initial_backoff_seconds": 0.05, "max_backoff_seconds": 0.1},
        "destinations": [{"name": "web", "kind": "dicomweb", "url": url}],
    })


def test_stow_delivers_to_orthanc_dicomweb_and_retries_a_wrong_url(orthanc, tmp_path, node_database):
    series = write_ct_series(tmp_path / "results", slices=2, size=16, seed=9)
    engine = create_engine_for(node_database.fresh(tmp_path / "d.db"))
    init_schema(engine)
    good = f"{orthanc.url}/dicom-web"
    wrong = config_for(f"{orthanc.url}/no-such-root", tmp_path)
    dispatcher = Dispatcher(wrong, engine, {DestinationKind.DICOMWEB: StowSender(10)})
    (delivery_id,) = dispatcher.enqueue(series.series_uid, 1, series.paths, series.sop_uids)
    dispatcher.run_once()
    row = dispatcher.get(delivery_id)
    assert row.state == DeliveryState.PENDING and "HTTP 404" in row.last_error
    dispatcher.apply_config(config_for(good, tmp_path))

    def delivered() -> bool:
        if dispatcher.get(delivery_id).state == DeliveryState.DELIVERED:
            return True
        dispatcher.run_once()
        return False

    wait_until(delivered, 30, "the delivery to reach the corrected DICOMweb root")
    assert sorted(orthanc.sop_instance_uids()) == sorted(series.sop_uids)
    engine.dispose()
