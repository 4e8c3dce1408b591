//! `cargo run -p hello -- Ada Grace`: finds the plugins linked into this binary, builds the
//! buses, and greets each name through the command bus.

// The linker drops crates nothing names: this line is what links the plugin in.
use hello_greeter as _;

use cqrs_core::PluginRegistrar;
use hello_api::Greet;
use hello_greeter::GreetingCount;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();

    let count = GreetingCount::default();
    let mut registrar = PluginRegistrar::new();
    registrar.provide(count.clone());
    let app = hello::start(registrar)?;

    println!("plugins: {}", app.plugins.join(", "));
    for (plugin, route) in &app.routes {
        println!("route {} from {plugin}: {}", route.path, route.description);
    }
    let mut names: Vec<String> = std::env::args().skip(1).collect();
    if names.is_empty() {
        names.push("world".into());
    }
    let mut failed = 0;
    for name in names {
        match app.commands.dispatch(Greet { name }).await {
            Ok(greeting) => println!("{greeting}"),
            Err(e) => {
                // To standard error, and the exit code says so: a script running this sees it.
                eprintln!("error ({}): {e}", e.kind().as_str());
                failed += 1;
            }
        }
    }
    println!("greetings counted by the event handler: {}", count.get());
    if failed > 0 {
        anyhow::bail!("{failed} greeting(s) failed");
    }
    Ok(())
}
