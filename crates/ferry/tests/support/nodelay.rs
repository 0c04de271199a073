//! Whether the connections a test opened send at once (TCP_NODELAY). Without it a write
//! made while an earlier one is unacknowledged waits for the server's delayed ACK, ~40 ms:
//! over TLS, any statement or command larger than one 16 KiB record (BENCHMARKS.md
//! section 20).

use rustix::net::{getpeername, sockopt};
use rustix::process::{PidfdFlags, PidfdGetfdFlags, getpid, pidfd_getfd, pidfd_open};

/// Asserts that this process holds at least `at_least` TCP connections to the port of
/// `server_url` (`scheme://user@host:port/path`), each with TCP_NODELAY on. `who` names the
/// client library, for the message.
pub(crate) fn assert_connections_send_at_once(server_url: &str, at_least: usize, who: &str) {
    let port = url::Url::parse(server_url)
        .ok()
        .and_then(|url| url.port())
        .unwrap_or_else(|| panic!("{server_url:?} names no port"));
    let nodelay = tcp_nodelay_of_connections_to(port);
    assert!(
        nodelay.len() >= at_least,
        "found {} connections to port {port}, expected at least {at_least}",
        nodelay.len()
    );
    assert!(
        nodelay.iter().all(|&on| on),
        "connections to port {port} with Nagle's algorithm on: {nodelay:?} (TCP_NODELAY per \
         connection): {who} must be told to set TCP_NODELAY"
    );
}

/// TCP_NODELAY of each socket of this process connected to `port`, read through a
/// duplicate of each descriptor in `/proc/self/fd` (`pidfd_getfd`).
fn tcp_nodelay_of_connections_to(port: u16) -> Vec<bool> {
    let this_process =
        pidfd_open(getpid(), PidfdFlags::empty()).expect("a pidfd of this process (Linux 5.3+)");
    let mut nodelay = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd").expect("/proc/self/fd is readable") {
        let Ok(entry) = entry else { continue };
        let is_socket = std::fs::read_link(entry.path())
            .is_ok_and(|target| target.to_string_lossy().starts_with("socket:"));
        let number = entry.file_name().to_str().and_then(|n| n.parse().ok());
        let Some(number) = number.filter(|_| is_socket) else {
            continue;
        };
        // The descriptor may have closed since the directory was read.
        let Ok(socket) = pidfd_getfd(&this_process, number, PidfdGetfdFlags::empty()) else {
            continue;
        };
        let peer = match getpeername(&socket) {
            Ok(Some(peer)) => std::net::SocketAddr::try_from(peer).ok(),
            _ => None,
        };
        if peer.is_some_and(|peer| peer.port() == port) {
            nodelay.push(sockopt::tcp_nodelay(&socket).expect("a TCP socket has TCP_NODELAY"));
        }
    }
    nodelay
}
