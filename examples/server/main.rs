//! The reference API server: the seed products' public APIs end to end on
//! keygate, in memory, with nothing to configure.
//!
//! ```text
//! cargo run --example server -- --bind 127.0.0.1:8080
//! ```
//!
//! The first line on stdout is one JSON object with the address, the
//! workspace and the bootstrap management token. The README walks through
//! the routes with `curl`.

mod app;

use std::error::Error;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use keygate::limit::PlanSet;
use serde_json::json;

/// keygate's reference API server.
#[derive(Parser)]
struct Args {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:8080")]
    bind: SocketAddr,
    /// The workspace the bootstrap management token belongs to.
    #[arg(long, default_value = "ws_demo")]
    workspace: String,
    /// A JSON file of plans (`{"plans": {...}}`) added to the presets;
    /// a plan with a preset's name replaces it.
    #[arg(long)]
    plans: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let args = Args::parse();
    let mut plans = PlanSet::presets();
    if let Some(path) = &args.plans {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        plans.extend(PlanSet::from_json(&text).map_err(|e| format!("{}: {e}", path.display()))?);
    }
    let workspace: keygate::store::WorkspaceId =
        args.workspace.parse().map_err(|e| format!("--workspace: {e}"))?;

    let listener = tokio::net::TcpListener::bind(args.bind).await?;
    let addr = listener.local_addr()?;
    let config =
        app::Config { workspace: workspace.clone(), plans, base_url: format!("http://{addr}") };
    let (router, manager) = app::router(app::Stores::memory(), config)?;
    let token = app::bootstrap(&manager, workspace.clone()).await?;

    // Keys in the documented order (a `json!` map would sort them).
    let first = format!(
        "{{\"listening\": {}, \"workspace\": {}, \"management_token\": {}}}",
        json!(addr.to_string()),
        json!(workspace.as_str()),
        json!(token.key().expose_secret()),
    );
    let mut out = std::io::stdout().lock();
    writeln!(out, "{first}")?;
    out.flush()?;
    drop(out);

    axum::serve(listener, router)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
