//! Sends one message to a running gateway and prints the reply as it streams.
//!
//! ```text
//! cargo run -p openpista-client --example ask -- 127.0.0.1:4433 <fingerprint> "What time is it?"
//! ```
//! The token is read from `OPENPISTA_TOKEN` (if set).

use futures::StreamExt;
use openpista_client::{Client, Event, Trust};
use openpista_proto::AgentEvent;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(addr), Some(fingerprint), Some(text)) = (args.next(), args.next(), args.next())
    else {
        anyhow::bail!("usage: ask <addr> <sha256 fingerprint> <message>");
    };
    let token = std::env::var("OPENPISTA_TOKEN").ok();
    let client = Client::connect(addr.parse()?, token, Trust::Fingerprint(fingerprint)).await?;
    let mut events = client.send(None, &text).await?;
    while let Some(event) = events.next().await {
        match event? {
            Event::Agent(AgentEvent::TextDelta { text }) => print!("{text}"),
            Event::Agent(AgentEvent::ToolStarted { name, .. }) => eprintln!("[running {name}]"),
            Event::Agent(AgentEvent::Final { .. }) => println!(),
            Event::Agent(AgentEvent::Error { code, message }) => {
                eprintln!("error ({}): {message}", code.as_str());
            }
            Event::Agent(AgentEvent::Accepted { .. } | AgentEvent::ToolFinished { .. }) => {}
            Event::ApprovalRequired { id, tool, .. }
            | Event::Agent(AgentEvent::ApprovalRequired { id, tool, .. }) => {
                eprintln!("[{tool} waits for approval {id}]")
            }
        }
    }
    client.close().await;
    Ok(())
}
