//! A reverse proxy in front of a test registry that drops every `Range` header, so the registry
//! answers ranged blob reads with the whole blob (`200`), as some registries do; it counts the
//! blob bytes it forwards. `range_stripping_proxy.py` (Python standard library only) on a free
//! loopback port; killed on drop.

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};

use super::{free_port, require, wait_for_port};

pub struct RangeStrippingProxy {
    pub port: u16,
    child: Child,
}

/// What the proxy has forwarded so far.
#[derive(Debug, Clone, Copy, serde::Deserialize)]
pub struct ProxyCounts {
    /// Response body bytes of blob `GET`s.
    pub blob_bytes: u64,
    pub blob_gets: u64,
    /// Requests whose `Range` header was dropped.
    pub ranges_stripped: u64,
}

impl RangeStrippingProxy {
    /// A proxy for the registry listening on `127.0.0.1:upstream_port`.
    pub fn start(upstream_port: u16) -> Self {
        let python = require("python3");
        let port = free_port();
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/support/range_stripping_proxy.py"
        );
        let child = Command::new(python)
            .arg(script)
            .arg(port.to_string())
            .arg(upstream_port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("start range_stripping_proxy.py");
        let proxy = Self { port, child };
        assert!(
            wait_for_port(&proxy.addr(), 30),
            "range_stripping_proxy.py did not listen on port {port}"
        );
        proxy
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The counters, from `GET /_count`.
    pub fn counts(&self) -> ProxyCounts {
        let mut s = std::net::TcpStream::connect(self.addr()).expect("connect to the proxy");
        write!(
            s,
            "GET /_count HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.addr()
        )
        .expect("ask the proxy");
        let mut answer = String::new();
        s.read_to_string(&mut answer).expect("read the proxy");
        let body = answer
            .split_once("\r\n\r\n")
            .map(|(_, b)| b)
            .unwrap_or_else(|| panic!("bad answer from the proxy: {answer}"));
        serde_json::from_str(body).expect("counts as JSON")
    }
}

impl Drop for RangeStrippingProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
