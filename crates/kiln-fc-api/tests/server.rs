//! The server on a real Unix socket, driven by the client and by raw bytes.

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_fc_api::http::{read_response, RawResponse};
use kiln_fc_api::models::*;
use kiln_fc_api::{
    ApiClient, ApiHandler, ApiRequest, ApiResponse, ApiServer, ClientError, Method, ServerConfig,
    ServerHandle,
};

/// Records every request; answers GETs with canned bodies, PUTs/PATCHes with 204, and a few
/// magic values with errors.
#[derive(Default)]
struct Fake {
    seen: Mutex<Vec<ApiRequest>>,
}

impl Fake {
    fn seen(&self) -> Vec<ApiRequest> {
        self.seen.lock().unwrap().clone()
    }
}

impl ApiHandler for Fake {
    fn handle(&self, req: ApiRequest) -> ApiResponse {
        self.seen.lock().unwrap().push(req.clone());
        match req {
            ApiRequest::GetInstanceInfo => ApiResponse::ok(&InstanceInfo {
                app_name: "kiln".into(),
                id: "vm0".into(),
                state: InstanceState::NotStarted,
                vmm_version: "0.1.0".into(),
            }),
            ApiRequest::GetVersion => {
                ApiResponse::ok(&FirecrackerVersion { firecracker_version: "1.16.1".into() })
            }
            ApiRequest::GetMachineConfig => ApiResponse::ok(&MachineConfiguration {
                vcpu_count: 2,
                mem_size_mib: 256,
                smt: false,
                cpu_template: None,
                track_dirty_pages: false,
                huge_pages: HugePages::None,
            }),
            ApiRequest::GetVmConfig => ApiResponse::ok(&FullVmConfiguration {
                boot_source: Some(BootSource {
                    kernel_image_path: "/k".into(),
                    boot_args: None,
                    initrd_path: None,
                }),
                ..Default::default()
            }),
            ApiRequest::GetBalloon => ApiResponse::ok(&Balloon {
                amount_mib: 1,
                deflate_on_oom: true,
                stats_polling_interval_s: 0,
                free_page_hinting: false,
                free_page_reporting: false,
            }),
            ApiRequest::GetBalloonStats => ApiResponse::ok(&BalloonStats::default()),
            ApiRequest::GetBalloonHintingStatus => {
                ApiResponse::ok(&BalloonHintingStatus { host_cmd: 0, guest_cmd: None })
            }
            ApiRequest::GetMmds => ApiResponse::ok(&serde_json::json!({"latest": {}})),
            ApiRequest::GetMemoryHotplug => ApiResponse::ok(&MemoryHotplugStatus::default()),
            ApiRequest::PutBootSource(b) if b.kernel_image_path == Path::new("/fail") => {
                ApiResponse::bad_request("Invalid kernel path: /fail")
            }
            ApiRequest::PutBootSource(b) if b.kernel_image_path == Path::new("/panic") => {
                panic!("handler bug")
            }
            _ => ApiResponse::no_content(),
        }
    }
}

struct Server {
    _dir: tempfile::TempDir,
    path: PathBuf,
    fake: Arc<Fake>,
    handle: Option<ServerHandle>,
}

impl Server {
    fn start() -> Self {
        Self::start_with(ServerConfig::default())
    }

    fn start_with(config: ServerConfig) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let fake = Arc::new(Fake::default());
        let handle = ApiServer::bind(&path).unwrap().with_config(config).spawn(fake.clone()).unwrap();
        Self { _dir: dir, path, fake, handle: Some(handle) }
    }

    fn client(&self) -> ApiClient {
        ApiClient::new(&self.path).with_timeout(Some(Duration::from_secs(10)))
    }

    fn raw(&self) -> UnixStream {
        let s = UnixStream::connect(&self.path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }

    /// Sends raw bytes on a fresh connection and reads one response.
    fn exchange(&self, bytes: &[u8]) -> RawResponse {
        let mut s = self.raw();
        s.write_all(bytes).unwrap();
        read_response(&mut s, 1 << 20).unwrap()
    }

    /// The server still answers a well-formed request.
    fn assert_alive(&self) {
        let v = self.client().get_version().unwrap();
        assert_eq!(v.firecracker_version, "1.16.1");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.shutdown();
        }
    }
}

fn fault(resp: &RawResponse) -> String {
    let e: ApiError = serde_json::from_slice(&resp.body)
        .unwrap_or_else(|e| panic!("not a fault_message body ({e}): {}", resp.text()));
    e.fault_message
}

#[test]
fn client_drives_every_typed_call() {
    let srv = Server::start();
    let mut c = srv.client();
    assert_eq!(c.get_instance_info().unwrap().id, "vm0");
    assert_eq!(c.get_version().unwrap().firecracker_version, "1.16.1");
    let boot = BootSource {
        kernel_image_path: "/k".into(),
        boot_args: Some("console=ttyS0".into()),
        initrd_path: None,
    };
    c.put_boot_source(&boot).unwrap();
    let drive = Drive {
        drive_id: "rootfs".into(),
        partuuid: None,
        is_root_device: true,
        cache_type: CacheType::Unsafe,
        is_read_only: Some(false),
        path_on_host: Some("/r.ext4".into()),
        rate_limiter: None,
        io_engine: IoEngine::Sync,
        socket: None,
    };
    c.put_drive(&drive).unwrap();
    c.patch_drive(&PartialDrive {
        drive_id: "rootfs".into(),
        path_on_host: Some("/r2".into()),
        rate_limiter: None,
    })
    .unwrap();
    let mc = MachineConfiguration {
        vcpu_count: 1,
        mem_size_mib: 128,
        smt: false,
        cpu_template: None,
        track_dirty_pages: true,
        huge_pages: HugePages::None,
    };
    c.put_machine_config(&mc).unwrap();
    assert_eq!(c.get_machine_config().unwrap().vcpu_count, 2);
    c.put_network_interface(&NetworkInterface {
        iface_id: "eth0".into(),
        host_dev_name: "tap0".into(),
        guest_mac: None,
        mtu: None,
        rx_rate_limiter: None,
        tx_rate_limiter: None,
    })
    .unwrap();
    c.put_vsock(&Vsock { vsock_id: None, guest_cid: 3, uds_path: "/v".into() }).unwrap();
    c.start_instance().unwrap();
    c.pause().unwrap();
    c.resume().unwrap();
    c.send_ctrl_alt_del().unwrap();
    assert!(c.get_vm_config().unwrap().boot_source.is_some());
    assert_eq!(c.get_balloon().unwrap().amount_mib, 1);
    assert_eq!(c.get_mmds().unwrap()["latest"], serde_json::json!({}));

    // Typed errors carry the fault_message.
    let err = c
        .put_boot_source(&BootSource {
            kernel_image_path: "/fail".into(),
            boot_args: None,
            initrd_path: None,
        })
        .unwrap_err();
    match &err {
        ClientError::Api { status, fault_message, .. } => {
            assert_eq!(*status, 400);
            assert_eq!(fault_message, "Invalid kernel path: /fail");
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("Invalid kernel path"));

    let seen = srv.fake.seen();
    assert!(seen.contains(&ApiRequest::PutBootSource(boot)));
    assert!(seen.contains(&ApiRequest::PutDrive(drive)));
    assert!(seen.contains(&ApiRequest::PutMachineConfig(mc)));
    assert!(
        seen.contains(&ApiRequest::PutAction(InstanceActionInfo { action_type: ActionType::InstanceStart }))
    );
    assert!(seen.contains(&ApiRequest::PatchVm(Vm { state: VmState::Paused })));
    assert!(
        seen.contains(&ApiRequest::PutAction(InstanceActionInfo { action_type: ActionType::SendCtrlAltDel }))
    );
}

#[test]
fn apply_config_sends_every_section() {
    let srv = Server::start();
    let cfg = parse_config_file(
        r#"{
          "boot-source": {"kernel_image_path": "/k"},
          "drives": [{"drive_id": "rootfs", "is_root_device": true, "path_on_host": "/r"}],
          "machine-config": {"vcpu_count": 1, "mem_size_mib": 64},
          "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0"}],
          "mmds-config": {"network_interfaces": ["eth0"]},
          "logger": {"level": "Info"},
          "entropy": {}
        }"#,
    )
    .unwrap();
    srv.client().apply_config(&cfg).unwrap();
    assert_eq!(srv.fake.seen().len(), 7);
}

/// Every (method, path) in the swagger.
fn swagger_routes() -> Vec<(String, String)> {
    let spec = include_str!("data/firecracker-api.yaml");
    let mut routes = Vec::new();
    let mut in_paths = false;
    let mut current: Option<String> = None;
    for line in spec.lines() {
        if line == "paths:" {
            in_paths = true;
            continue;
        }
        if in_paths && !line.is_empty() && !line.starts_with(' ') {
            break;
        }
        if let Some(p) = line.strip_prefix("  /") {
            current = Some(format!("/{}", p.trim_end_matches(':')));
        } else if let Some(m) = line.strip_prefix("    ") {
            let m = m.trim_end_matches(':');
            if ["get", "put", "patch", "post", "delete"].contains(&m) {
                if let Some(p) = &current {
                    routes.push((m.to_uppercase(), p.clone()));
                }
            }
        }
    }
    routes
}

#[test]
fn swagger_paths_are_all_routed() {
    let routes = swagger_routes();
    assert!(routes.len() >= 38, "parsed only {} routes", routes.len());
    let srv = Server::start();
    let mut c = srv.client();
    for (m, p) in &routes {
        let path = p.replace("{drive_id}", "x1").replace("{iface_id}", "x1").replace("{id}", "x1");
        let method = match m.as_str() {
            "GET" => Method::Get,
            "PUT" => Method::Put,
            "PATCH" => Method::Patch,
            other => Method::Other(other.into()),
        };
        // GETs without a body; the rest with an empty object (mostly missing fields).
        let body = (method != Method::Get).then_some(&b"{}"[..]);
        let resp = c.request(method, &path, body).unwrap();
        assert!(resp.status != 404 && resp.status < 500, "{m} {path}: {} {}", resp.status, resp.text());
        if resp.status == 400 {
            let msg = fault(&resp);
            assert!(
                !msg.starts_with("Invalid request method and/or path"),
                "{m} {path} is not routed: {msg}"
            );
        }
    }
}

#[test]
fn unknown_paths_methods_fields_and_types_get_400_with_fault_message() {
    let srv = Server::start();
    let mut c = srv.client();
    let cases: &[(Method, &str, Option<&str>, &str)] = &[
        (Method::Get, "/nope", None, "Invalid request method and/or path: GET /nope."),
        (
            Method::Other("POST".into()),
            "/actions",
            Some("{}"),
            "Invalid request method and/or path: POST /actions.",
        ),
        (
            Method::Other("DELETE".into()),
            "/drives/x",
            None,
            "Invalid request method and/or path: DELETE /drives/x.",
        ),
        (
            Method::Put,
            "/boot-source",
            Some(r#"{"kernel_image_path":"/k","bogus":true}"#),
            "unknown field `bogus`",
        ),
        (
            Method::Put,
            "/machine-config",
            Some(r#"{"vcpu_count":"two","mem_size_mib":1}"#),
            "invalid type: string \"two\"",
        ),
        (Method::Put, "/boot-source", Some("{"), "EOF while parsing"),
        (Method::Put, "/boot-source", None, "Empty PUT request."),
        (Method::Get, "/", Some("{}"), "GET request cannot have a body."),
        (
            Method::Put,
            "/drives/a",
            Some(r#"{"drive_id":"b","is_root_device":true}"#),
            "The id from the path does not match the id from the body!",
        ),
        (
            Method::Put,
            "/drives/a$",
            Some(r#"{"drive_id":"a$","is_root_device":true}"#),
            "alphanumeric characters and underscores",
        ),
    ];
    for (m, p, b, want) in cases {
        let resp = c.request(m.clone(), p, b.map(str::as_bytes)).unwrap();
        assert_eq!(resp.status, 400, "{m} {p}: {}", resp.text());
        let msg = fault(&resp);
        assert!(msg.contains(want), "{m} {p}: {msg}");
        // The connection stays open after a routing-level error.
        assert!(resp.keep_alive, "{m} {p}");
    }
    // All of these went over one kept-alive connection; the handler saw none of them.
    assert!(srv.fake.seen().is_empty());
    srv.assert_alive();
}

#[test]
fn malformed_http_gets_400_and_the_server_keeps_serving() {
    let srv = Server::start();
    for bad in [
        &b"garbage\r\n\r\n"[..],
        b"GET /\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
        b"GET / HTTP/1.1\r\nno colon here\r\n\r\n",
        b"PUT /boot-source HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
        b"PUT /boot-source HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"\x00\x01\x02\x03\r\n\r\n",
        b"GET /\xff\xfe HTTP/1.1\r\n\r\n",
    ] {
        let resp = srv.exchange(bad);
        assert_eq!(resp.status, 400, "{:?}: {}", String::from_utf8_lossy(bad), resp.text());
        assert!(!fault(&resp).is_empty());
        assert!(!resp.keep_alive);
    }
    // A head that never ends.
    let mut s = srv.raw();
    let _ = s.write_all(&vec![b'A'; 20_000]);
    let resp = read_response(&mut s, 1 << 20).unwrap();
    assert_eq!(resp.status, 400);
    srv.assert_alive();
}

#[test]
fn oversized_bodies_are_refused_before_reading() {
    let srv = Server::start();
    // Declared larger than the limit, body never sent: answered at once.
    let resp = srv.exchange(
        b"PUT /mmds/config HTTP/1.1\r\nContent-Length: 51201\r\nAccept: application/json\r\n\r\nsome body",
    );
    assert_eq!(resp.status, 400);
    assert_eq!(
        fault(&resp),
        "Request payload with size 51201 is larger than the limit of 51200 allowed by server."
    );
    // Exactly at the limit is accepted.
    let filler = "x".repeat(51_200 - r#"{"k":""}"#.len());
    let body = format!(r#"{{"k":"{filler}"}}"#);
    assert_eq!(body.len(), 51_200);
    let resp = srv.client().request(Method::Put, "/mmds", Some(body.as_bytes())).unwrap();
    assert_eq!(resp.status, 204, "{}", resp.text());
    srv.assert_alive();
}

#[test]
fn clients_closing_mid_request_do_not_hurt_the_server() {
    let srv = Server::start();
    for partial in [
        &b""[..],
        b"PUT /boot-so",
        b"PUT /boot-source HTTP/1.1\r\nContent-Le",
        b"PUT /boot-source HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"kernel",
    ] {
        let mut s = srv.raw();
        s.write_all(partial).unwrap();
        drop(s);
    }
    // Half-close: the client stops writing but still reads.
    let mut s = srv.raw();
    s.write_all(b"PUT /boot-source HTTP/1.1\r\nContent-Length: 10\r\n\r\n{}").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    // A client that sends a request and leaves before the answer.
    let mut s = srv.raw();
    s.write_all(b"GET /version HTTP/1.1\r\n\r\n").unwrap();
    drop(s);
    srv.assert_alive();
    assert!(srv.fake.seen().iter().all(|r| !matches!(r, ApiRequest::PutBootSource(_))));
}

#[test]
fn keep_alive_pipelining_and_http10() {
    let srv = Server::start();
    let mut s = srv.raw();
    s.write_all(
        b"GET /version HTTP/1.1\r\n\r\n\
          PUT /actions HTTP/1.1\r\nContent-Length: 32\r\n\r\n{\"action_type\":\"InstanceStart\"}\n\
          GET / HTTP/1.1\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let mut all = Vec::new();
    s.read_to_end(&mut all).unwrap();
    let text = String::from_utf8(all).unwrap();
    let statuses: Vec<&str> = text.match_indices("HTTP/1.1 ").map(|(i, _)| &text[i + 9..i + 12]).collect();
    assert_eq!(statuses, ["200", "204", "200"], "{text}");
    assert!(text.contains("Connection: close"));

    // HTTP/1.0 closes after one response.
    let mut s = srv.raw();
    s.write_all(b"GET /version HTTP/1.0\r\n\r\n").unwrap();
    let mut all = Vec::new();
    s.read_to_end(&mut all).unwrap();
    assert!(String::from_utf8_lossy(&all).starts_with("HTTP/1.1 200"));

    // Expect: 100-continue (curl sends it for larger bodies).
    let mut s = srv.raw();
    s.write_all(b"PATCH /vm HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 18\r\n\r\n").unwrap();
    let mut buf = [0u8; 25];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(br#"{"state":"Paused"}"#).unwrap();
    let resp = read_response(&mut s, 1024).unwrap();
    assert_eq!(resp.status, 204, "{}", resp.text());
}

#[test]
fn a_panicking_handler_gets_500_and_the_server_survives() {
    let srv = Server::start();
    let resp = srv
        .client()
        .request(Method::Put, "/boot-source", Some(br#"{"kernel_image_path":"/panic"}"#))
        .unwrap();
    assert_eq!(resp.status, 500);
    assert!(!fault(&resp).is_empty());
    srv.assert_alive();
}

#[test]
fn client_reconnects_after_the_server_closed_the_connection() {
    let srv = Server::start_with(ServerConfig {
        idle_timeout: Some(Duration::from_millis(100)),
        ..Default::default()
    });
    let mut c = srv.client();
    c.get_version().unwrap();
    // The server drops the idle kept-alive connection; the client notices and reconnects.
    std::thread::sleep(Duration::from_millis(400));
    c.get_version().unwrap();
    c.start_instance().unwrap();
    // Paths that would break the request line are refused by the client itself.
    let err = c.request(Method::Get, "/ HTTP/1.1\r\nX: y", None).unwrap_err();
    assert!(matches!(err, ClientError::Transport { .. }), "{err:?}");
    c.get_version().unwrap();
}

#[test]
fn random_bytes_never_take_the_server_down() {
    let srv = Server::start();
    let mut x: u64 = 0x1234_5678_9abc_def1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for i in 0..300 {
        let len = (next() % 600) as usize;
        let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        if i % 3 == 0 {
            // Start like a request so the parser gets further.
            let mut v = b"PUT /drives/x HTTP/1.1\r\nContent-Length: 7\r\n".to_vec();
            v.extend_from_slice(&bytes);
            bytes = v;
        }
        let mut s = srv.raw();
        s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let _ = s.write_all(&bytes);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
        if !sink.is_empty() {
            // Whatever came back is well-formed HTTP with a sane status.
            let resp = read_response(&mut &sink[..], 1 << 20).unwrap();
            assert!(resp.status < 500, "{}", resp.status);
        }
    }
    srv.assert_alive();
}

/// A real HTTP client (curl), when installed, gets the same answers.
#[test]
fn curl_talks_to_the_server() {
    let Ok(out) = std::process::Command::new("curl").arg("--version").output() else {
        eprintln!("SKIPPED: curl is not installed");
        return;
    };
    assert!(out.status.success());
    let srv = Server::start();
    let sock = srv.path.to_str().unwrap().to_string();
    let curl = |args: &[&str]| -> String {
        let out = std::process::Command::new("curl")
            .args(["-s", "-i", "--max-time", "10", "--unix-socket", &sock])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let r = curl(&["http://localhost/version"]);
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(r.contains(r#"{"firecracker_version":"1.16.1"}"#), "{r}");
    let r = curl(&[
        "-X",
        "PUT",
        "-H",
        "Content-Type: application/json",
        "-d",
        r#"{"kernel_image_path":"/k","boot_args":"console=ttyS0"}"#,
        "http://localhost/boot-source",
    ]);
    assert!(r.starts_with("HTTP/1.1 204"), "{r}");
    // A body big enough for curl to use `Expect: 100-continue` on older versions.
    let big = format!(r#"{{"k":"{}"}}"#, "v".repeat(40_000));
    let r = curl(&["-X", "PUT", "-d", &big, "http://localhost/mmds"]);
    assert!(r.contains("HTTP/1.1 204"), "{r}");
    let too_big = format!(r#"{{"k":"{}"}}"#, "v".repeat(60_000));
    let r = curl(&["-X", "PUT", "-d", &too_big, "http://localhost/mmds"]);
    assert!(r.contains("HTTP/1.1 400"), "{r}");
    assert!(r.contains("larger than the limit of 51200"), "{r}");
    let r = curl(&["-X", "DELETE", "http://localhost/drives/rootfs"]);
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    assert!(r.contains("Invalid request method and/or path: DELETE /drives/rootfs."), "{r}");
    srv.assert_alive();
}

#[test]
fn connections_over_the_limit_are_closed_and_the_server_recovers() {
    let srv = Server::start_with(ServerConfig { max_connections: 2, ..Default::default() });
    let mut a = srv.raw();
    let mut b = srv.raw();
    // Make sure both are being served before opening a third.
    for s in [&mut a, &mut b] {
        s.write_all(b"GET /version HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(read_response(s, 1024).unwrap().status, 200);
    }
    let mut c = srv.raw();
    let _ = c.write_all(b"GET /version HTTP/1.1\r\n\r\n");
    let mut sink = Vec::new();
    let _ = c.read_to_end(&mut sink);
    assert!(sink.is_empty(), "{}", String::from_utf8_lossy(&sink));
    drop(a);
    drop(b);
    // The connection threads notice the close and free their slots.
    let mut ok = false;
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(20));
        let mut s = srv.raw();
        if s.write_all(b"GET /version HTTP/1.1\r\n\r\n").is_ok() {
            if let Ok(r) = read_response(&mut s, 1024) {
                ok = r.status == 200;
                if ok {
                    break;
                }
            }
        }
    }
    assert!(ok, "the server did not recover its connection slots");
}

#[test]
fn a_trait_object_handler_and_serve_connection_on_a_socketpair() {
    let handler: Arc<dyn ApiHandler> = Arc::new(Fake::default());
    let (mut ours, theirs) = UnixStream::pair().unwrap();
    let h = handler.clone();
    let t = std::thread::spawn(move || {
        kiln_fc_api::serve_connection(theirs, h.as_ref(), &ServerConfig::default())
    });
    ours.write_all(b"GET /version HTTP/1.1\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut ours, 1024).unwrap().status, 200);
    drop(ours);
    t.join().unwrap();
    // And the same handler type behind a socket.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s");
    let server = ApiServer::bind(&path).unwrap().spawn(handler).unwrap();
    ApiClient::new(&path).get_version().unwrap();
    server.shutdown();
}
