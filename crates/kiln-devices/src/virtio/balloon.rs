//! TODO: virtio-balloon (being written).
