//! The `ledger` binary: `ledger` (or `ledger serve`) serves, `ledger migrate` applies the
//! migrations and exits. Exit status 2 means bad configuration or usage.

use std::process::ExitCode;

use ledger::{db, init_logging, shutdown, Application, Config};

fn main() -> ExitCode {
    // The real environment wins over `.env`; a missing `.env` is fine.
    if let Err(e) = dotenvy::dotenv() {
        if !e.not_found() {
            eprintln!("ledger: cannot read .env: {e}");
            return ExitCode::from(2);
        }
    }
    init_logging();
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("ledger: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    let command = std::env::args().nth(1);
    let result = match command.as_deref() {
        None | Some("serve") => actix_web::rt::System::new().block_on(serve(config)),
        Some("migrate") => actix_web::rt::System::new().block_on(migrate(config)),
        Some(other) => {
            eprintln!("ledger: unknown command {other:?}; usage: ledger [serve|migrate]");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> Result<(), String> {
    log::info!("starting: {config}");
    let app = Application::build(config)
        .await
        .map_err(|e| format!("cannot start: {e}"))?;
    log::info!("listening on port {}", app.port());
    shutdown::run_with_signals(app)
        .await
        .map_err(|e| format!("server error: {e}"))
}

async fn migrate(config: Config) -> Result<(), String> {
    let applied = db::migrate::run_pending(&db::migrate::standalone_connector(&config.db))
        .await
        .map_err(|e| e.to_string())?;
    if applied.is_empty() {
        log::info!("nothing to migrate");
    } else {
        log::info!("applied migrations: {}", applied.join(", "));
    }
    Ok(())
}
