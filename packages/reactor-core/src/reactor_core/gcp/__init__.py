"""Running on Google Cloud VMs: the metadata server, the preemption watcher, spot settings.

    metadata.py    is this a GCP VM, is it spot (GcpInfo, MetadataClient, detect_gcp)
    preemption.py  SIGTERM/SIGINT and the GCP preemption notice -> checkpoint and exit 75
    spot.py        SpotVMCheckpointer (the seed's API) and the spot checkpoint clock

gs:// checkpoint storage is a checkpoint mirror like any other: `reactor_core.checkpoints.remote`.
"""

from reactor_core.gcp.spot import SpotVMCheckpointer

__all__ = ["SpotVMCheckpointer"]
