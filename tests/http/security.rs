//! TLS and API keys against a real `sluice serve` process: a handshake with
//! a self-signed certificate made here, certificate and key reload on
//! SIGHUP, keys created with `sluice keys add`, and a stalled handshake cut
//! by the header timeout.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, ServerName};

use super::hostile::{closed_by_server, daemon, request};

const EXE: &str = env!("CARGO_BIN_EXE_sluice");
const EVENT: &str = r#"{"tenant_id":"acme","source":"s","message":"m"}"#;

/// Writes a fresh self-signed certificate for localhost; returns its DER.
fn write_cert(dir: &Path) -> CertificateDer<'static> {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    // Write the key first and rename both into place, as an operator's
    // tooling would, so a reload never sees a mismatched pair for long.
    std::fs::write(dir.join("key.pem.new"), ck.key_pair.serialize_pem()).unwrap();
    std::fs::write(dir.join("cert.pem.new"), ck.cert.pem()).unwrap();
    std::fs::rename(dir.join("key.pem.new"), dir.join("key.pem")).unwrap();
    std::fs::rename(dir.join("cert.pem.new"), dir.join("cert.pem")).unwrap();
    ck.cert.der().clone()
}

/// One HTTPS request trusting only `trusted`; returns the status and the
/// certificate the server presented.
fn https(
    addr: &str,
    trusted: &CertificateDer<'static>,
    raw: &str,
) -> Result<(u16, String, CertificateDer<'static>), String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trusted.clone()).map_err(|e| e.to_string())?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), name).map_err(|e| e.to_string())?;
    let sock = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut tls = rustls::StreamOwned::new(conn, sock);
    tls.write_all(raw.as_bytes()).map_err(|e| e.to_string())?;
    let mut resp = Vec::new();
    // The server may close without close_notify after Connection: close.
    let _ = tls.read_to_end(&mut resp);
    let resp = String::from_utf8_lossy(&resp).into_owned();
    let peer = tls
        .conn
        .peer_certificates()
        .and_then(|c| c.first().cloned())
        .ok_or("no peer certificate")?;
    let status = resp.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    Ok((status, resp, peer.into_owned()))
}

fn post(key: Option<&str>) -> String {
    let auth = key.map_or(String::new(), |k| format!("Authorization: Bearer {k}\r\n"));
    format!(
        "POST /v1/events HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{EVENT}",
        EVENT.len()
    )
}

fn sighup(pid: u32) {
    let ok = Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

#[test]
fn https_with_a_self_signed_cert_reloaded_on_sighup() {
    let certs = tempfile::tempdir().unwrap();
    let first = write_cert(certs.path());
    let cert = certs.path().join("cert.pem");
    let key = certs.path().join("key.pem");
    let mut d = daemon(&[
        ("SLUICE_HTTP_TLS_CERT_FILE", cert.to_str().unwrap()),
        ("SLUICE_HTTP_TLS_KEY_FILE", key.to_str().unwrap()),
    ]);
    let (status, resp, presented) = https(&d.addr, &first, &post(None)).unwrap();
    assert_eq!(status, 202, "{resp}");
    assert_eq!(presented, first);

    // Plain HTTP to the TLS port gets no HTTP answer.
    let (status, _) = request(&d.addr, &post(None));
    assert_eq!(status, 0, "plaintext must not be served on the TLS port");

    // A handshake that never starts is cut by the header timeout (500 ms
    // in this daemon), like a slowloris.
    let mut idle = TcpStream::connect(&d.addr).unwrap();
    assert!(closed_by_server(&mut idle, Duration::from_secs(5)));

    // A broken certificate file on SIGHUP keeps the old one in service.
    std::fs::write(&cert, "not a certificate").unwrap();
    sighup(d.child.id());
    std::thread::sleep(Duration::from_millis(300));
    let (status, _, presented) = https(&d.addr, &first, &post(None)).unwrap();
    assert_eq!((status, presented), (202, first.clone()));

    // A new certificate on SIGHUP is served to new connections.
    let second = write_cert(certs.path());
    sighup(d.child.id());
    let t0 = Instant::now();
    loop {
        match https(&d.addr, &second, &post(None)) {
            Ok((202, _, presented)) => {
                assert_eq!(presented, second);
                break;
            }
            other => assert!(
                t0.elapsed() < Duration::from_secs(10),
                "new certificate not served: {other:?}"
            ),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        https(&d.addr, &first, &post(None)).is_err(),
        "the old certificate is no longer presented"
    );
    assert!(
        d.child.try_wait().unwrap().is_none(),
        "SIGHUP does not stop the daemon"
    );
}

fn keys_add(file: &Path, name: &str, tenant: &str) -> String {
    let out = Command::new(EXE)
        .args(["keys", "add", "--file"])
        .arg(file)
        .args(["--name", name, "--tenant", tenant])
        .stderr(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn keys_made_by_the_cli_are_enforced_and_picked_up_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.toml");
    let acme = keys_add(&file, "acme-shipper", "acme");
    assert!(acme.starts_with("sluice_"));
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(!text.contains(&acme), "only the hash is stored");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "keys file is private: {mode:o}");
    }
    // `keys hash` reads the key from stdin and prints what the file holds.
    let mut child = Command::new(EXE)
        .args(["keys", "hash"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{acme}").unwrap();
    let out = child.wait_with_output().unwrap();
    let hash = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains(hash.trim()), "{hash} not in {text}");

    let d = daemon(&[
        ("SLUICE_AUTH_KEYS_FILE", file.to_str().unwrap()),
        ("SLUICE_AUTH_RELOAD_INTERVAL_MS", "100"),
    ]);
    assert_eq!(request(&d.addr, &post(None)).0, 401);
    assert_eq!(request(&d.addr, &post(Some("sluice_nope"))).0, 401);
    assert_eq!(request(&d.addr, &post(Some(&acme))).0, 202);
    // A key for another tenant: 403 for acme's event.
    let globex = keys_add(&file, "globex-shipper", "globex");
    let t0 = Instant::now();
    loop {
        let status = request(&d.addr, &post(Some(&globex))).0;
        if status == 403 {
            break;
        }
        assert_eq!(status, 401, "before the reload the key is unknown");
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "keys file change not picked up"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The daemon still takes acme's key: adding one did not drop others.
    assert_eq!(request(&d.addr, &post(Some(&acme))).0, 202);
}
