//! Image benchmarks (run by `bench/image`): a 5-layer, ~100 MB image in a local `docker-registry`;
//! times a cold pull, the rootfs ext4 build from the cached image, and a VM's disk copy.
//!
//! `cargo run --release -p kiln-image --example image_bench -- [TOTAL_MB] [ROUNDS]`
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use kiln_image::{ImageStore, NoProgress, ProgressEvent, Reference, RegistryOptions, RootfsOptions};
use kiln_test_utils::oci::{five_layer_image, OciLayout};
use kiln_test_utils::registry::LocalRegistry;

fn stats(name: &str, samples: &mut [Duration]) {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{name:<38} min {:>8.1} ms  median {:>8.1} ms  max {:>8.1} ms  (n={})",
        ms(samples[0]),
        ms(samples[samples.len() / 2]),
        ms(samples[samples.len() - 1]),
        samples.len()
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let total_mb: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(100);
    let rounds: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(3);
    let work = tempfile::tempdir().unwrap();
    let registry = LocalRegistry::start();

    let layers = five_layer_image(total_mb);
    let mut layout = OciLayout::create(&work.path().join("layout"));
    layout.add_image(&layers, true, serde_json::json!({"Cmd": ["/bin/sh"]}), "latest");
    registry.push_oci(&layout.dir, "latest", "bench/five-layers:latest");
    let reference = Reference::parse(&format!("{}/bench/five-layers:latest", registry.host())).unwrap();
    let unpacked: usize = layers.iter().map(Vec::len).sum();
    println!("image: 5 layers, {:.1} MB of tar, registry {}", unpacked as f64 / 1e6, registry.host());

    let mut pulls = Vec::new();
    let mut builds = Vec::new();
    let mut unpacks = Vec::new();
    let mut mkfses = Vec::new();
    let mut disks = Vec::new();
    for round in 0..rounds {
        let images = ImageStore::open(&work.path().join(format!("state{round}"))).unwrap();
        let start = Instant::now();
        images.pull(&reference, &RegistryOptions::default(), &NoProgress).unwrap();
        pulls.push(start.elapsed());

        let start = Instant::now();
        let mkfs_started = std::sync::Mutex::new(None);
        let progress = |event: ProgressEvent| {
            if let ProgressEvent::BuildingFilesystem { .. } = event {
                *mkfs_started.lock().unwrap() = Some(Instant::now());
            }
        };
        let rootfs = images.rootfs(&reference.to_string(), &RootfsOptions::default(), &progress).unwrap();
        builds.push(start.elapsed());
        let mkfs_start = mkfs_started.lock().unwrap().unwrap();
        unpacks.push(mkfs_start - start);
        mkfses.push(mkfs_start.elapsed());
        assert!(!rootfs.cached);

        let start = Instant::now();
        let disk = work.path().join(format!("vm{round}.ext4"));
        let method = images
            .vm_disk(&reference.to_string(), &disk, Some(1 << 30), &RootfsOptions::default(), &NoProgress)
            .unwrap();
        disks.push(start.elapsed());
        if round == 0 {
            println!("rootfs image {} bytes; VM disk copy method {method:?}, grown to 1 GiB", rootfs.size);
        }
    }
    stats("cold pull (5 layers, local registry)", &mut pulls);
    stats("rootfs ext4 build from cached image", &mut builds);
    stats("  of which: unpack layers to staging", &mut unpacks);
    stats("  of which: mkfs.ext4 -d", &mut mkfses);
    stats("VM disk copy + grow to 1 GiB", &mut disks);
}
