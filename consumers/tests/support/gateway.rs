//! The fake payment gateway, served in the test process on a port of its own. It stands for a
//! third party: the consumer processes the drills kill talk to it over HTTP, and its request log
//! and ledger (in its own schema) are the evidence the drills count from.

use consumers::gateway::client::GatewayClient;
use consumers::gateway::{self, GatewayFaults};
use relay::shutdown::Shutdown;
use std::net::SocketAddr;
use std::time::Duration;

pub struct Gateway {
    pub addr: SocketAddr,
    shutdown: Shutdown,
}

impl Gateway {
    pub async fn start(database_url: &str, faults: GatewayFaults) -> Gateway {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        // The schema is created before serving, so a request never races it.
        drop(
            gateway::connect(database_url)
                .await
                .expect("gateway schema"),
        );
        let shutdown = Shutdown::new();
        let (url, s) = (database_url.to_owned(), shutdown.clone());
        tokio::spawn(async move {
            gateway::serve(listener, &url, faults, s)
                .await
                .expect("gateway serves");
        });
        Gateway { addr, shutdown }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A client for reading the ledger and the log (generous timeout: they can be long).
    pub fn client(&self) -> GatewayClient {
        GatewayClient::new(&self.url(), Duration::from_secs(30))
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.shutdown.trigger();
    }
}
