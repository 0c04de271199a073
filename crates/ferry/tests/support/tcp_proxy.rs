//! A TCP proxy a test can cut and restore, to break a client's connection to a shared
//! broker without restarting the broker (which other tests use).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Forwards `127.0.0.1:<port>` to `upstream` while up; cutting it closes every forwarded
/// connection and stops listening, so that connecting fails until it is restored.
pub(crate) struct TcpProxy {
    pub(crate) port: u16,
    upstream: SocketAddr,
    acceptor: Option<JoinHandle<()>>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl TcpProxy {
    /// A proxy on a free port, not listening yet (the broker looks down).
    pub(crate) fn down(upstream: SocketAddr) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a free port")
            .port();
        Self {
            port,
            upstream,
            acceptor: None,
            connections: Arc::default(),
        }
    }

    /// Starts (again) listening and forwarding.
    pub(crate) async fn restore(&mut self) {
        if self.acceptor.is_some() {
            return;
        }
        let listener = TcpListener::bind(("127.0.0.1", self.port))
            .await
            .expect("the proxy port is free again");
        let upstream = self.upstream;
        let connections = Arc::clone(&self.connections);
        self.acceptor = Some(tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let forward = tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                connections.lock().expect("not poisoned").push(forward);
            }
        }));
    }

    /// Closes every forwarded connection and stops listening.
    pub(crate) fn cut(&mut self) {
        if let Some(acceptor) = self.acceptor.take() {
            acceptor.abort();
        }
        for connection in self.connections.lock().expect("not poisoned").drain(..) {
            connection.abort();
        }
    }
}

/// The address in `url` (`scheme://[user:password@]host:port/...`), resolved.
pub(crate) fn address_of(url: &str) -> SocketAddr {
    let authority = url
        .split("://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .and_then(|authority| authority.rsplit('@').next())
        .expect("a URL with a host and port");
    std::net::ToSocketAddrs::to_socket_addrs(authority)
        .expect("a resolvable host and port")
        .next()
        .expect("at least one address")
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.cut();
    }
}
