//! Shared harness: a real Agent (scripted model, SQLite in a temp dir, the
//! built-in tools) behind the production gateway.
#![allow(dead_code)]

use std::sync::Arc;

use openpista_agent::{Agent, AgentConfig, AgentParts};
use openpista_client::{Client, Trust};
use openpista_gateway::{Gateway, GatewayConfig, QuicServer, TlsIdentity};
use openpista_llm::scripted::{Script, ScriptedProvider};
use openpista_memory::Store;
use openpista_tools::builtin_registry;

pub const TOKEN: &str = "correct horse battery staple";

pub struct Harness {
    pub gateway: Gateway,
    pub llm: Arc<ScriptedProvider>,
    pub store: Store,
    pub dir: tempfile::TempDir,
}

pub async fn harness(script: &str, cfg: &GatewayConfig) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("db.sqlite")).await.unwrap();
    let llm = Arc::new(ScriptedProvider::new(Script::from_toml(script).unwrap()));
    let workspace = dir.path().join("ws");
    std::fs::create_dir_all(&workspace).unwrap();
    std::fs::write(workspace.join("notes.txt"), "remember the milk").unwrap();
    let tools = builtin_registry(Default::default(), Default::default(), Vec::new()).unwrap();
    let agent = Agent::new(AgentParts {
        llm: llm.clone(),
        tools: Arc::new(tools),
        store: store.clone(),
        config: AgentConfig::default(),
        workspace,
        skills_context: String::new(),
    });
    Harness {
        gateway: Gateway::new(agent, cfg),
        llm,
        store,
        dir,
    }
}

pub struct Server {
    pub server: QuicServer,
    pub h: Harness,
}

impl Server {
    pub fn addr(&self) -> std::net::SocketAddr {
        self.server.local_addr()
    }

    pub fn trust(&self) -> Trust {
        Trust::Fingerprint(self.server.fingerprint().to_owned())
    }

    pub async fn client(&self) -> Client {
        Client::connect(self.addr(), Some(TOKEN.into()), self.trust())
            .await
            .unwrap()
    }
}

pub fn loopback_config() -> GatewayConfig {
    GatewayConfig {
        bind: "127.0.0.1:0".into(),
        ..GatewayConfig::default()
    }
}

/// The production server on an ephemeral loopback port, with a token.
pub async fn server(script: &str, cfg: GatewayConfig) -> Server {
    let h = harness(script, &cfg).await;
    let tls = TlsIdentity::load_or_generate(&h.dir.path().join("tls")).unwrap();
    let server = QuicServer::bind(h.gateway.clone(), &cfg, tls, Some(TOKEN.into())).unwrap();
    Server { server, h }
}
