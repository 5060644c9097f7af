//! Progress reporting. This crate never prints: it reports events to a [`Progress`] the caller
//! provides (the CLI draws one bar per layer from them; tests record them).

use crate::digest::Digest;

/// What a blob is, for progress display.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlobKind {
    Manifest,
    Config,
    /// Layer `index` (0-based) of `count`.
    Layer {
        index: usize,
        count: usize,
    },
}

/// One step of a pull, import or build.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProgressEvent {
    /// Resolving a name to a manifest (`reference` as given).
    Resolving { reference: String },
    /// The image's manifest digest is known.
    Resolved { reference: String, manifest: Digest, layers: usize },
    /// A blob transfer starts (`size` from the manifest).
    BlobStarted { digest: Digest, kind: BlobKind, size: u64 },
    /// Bytes received so far for a blob (monotonic, ≤ size).
    BlobProgress { digest: Digest, done: u64, size: u64 },
    /// A blob is verified and stored; `reused` when it was already in the store.
    BlobDone { digest: Digest, reused: bool },
    /// Applying layer `index` (0-based) of `count` to the staging root filesystem.
    Unpacking { index: usize, count: usize, digest: Digest },
    /// Writing the ext4 image.
    BuildingFilesystem { bytes: u64 },
    /// A cached result was used instead of building.
    CacheHit { what: String },
}

/// Receives progress events; called from the worker threads of a pull, hence `Sync`.
pub trait Progress: Sync {
    fn event(&self, event: ProgressEvent);
}

/// Ignores all events.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn event(&self, _: ProgressEvent) {}
}

impl<F: Fn(ProgressEvent) + Sync> Progress for F {
    fn event(&self, event: ProgressEvent) {
        self(event)
    }
}
