//! TODO: virtio-net (being written).
