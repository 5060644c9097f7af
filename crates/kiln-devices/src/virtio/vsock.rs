//! TODO: virtio-vsock (being written).
