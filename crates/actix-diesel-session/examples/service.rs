//! A complete small service: `POST /notes` stores the request body as a note and answers
//! 201 with its id; `GET /notes/{id}` answers the note, or 404. Each request runs in one
//! transaction, committed before its response leaves.
//!
//! `DATABASE_URL=postgres://... PORT=8080 cargo run -p actix-diesel-session --example service`

use actix_diesel_session::{Database, DatabaseUrl, DbSession, SessionConfig, SessionError};
use actix_web::{web, App, HttpResponse, HttpServer};
use diesel::sql_types::{BigInt, Text};
use diesel::OptionalExtension;
use diesel_async::RunQueryDsl;

#[derive(diesel::QueryableByName)]
struct Note {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = Text)]
    body: String,
}

async fn create(db: DbSession, body: String) -> Result<HttpResponse, SessionError> {
    let note: Note = diesel::sql_query("INSERT INTO notes (body) VALUES ($1) RETURNING id, body")
        .bind::<Text, _>(body)
        .get_result(&mut *db.conn().await?)
        .await?;
    Ok(HttpResponse::Created().body(note.id.to_string()))
}

async fn show(db: DbSession, id: web::Path<i64>) -> Result<HttpResponse, SessionError> {
    let note: Option<Note> = diesel::sql_query("SELECT id, body FROM notes WHERE id = $1")
        .bind::<BigInt, _>(id.into_inner())
        .get_result(&mut *db.conn().await?)
        .await
        .optional()?;
    Ok(match note {
        Some(note) => HttpResponse::Ok().body(note.body),
        None => HttpResponse::NotFound().finish(),
    })
}

#[actix_web::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    env_logger::init(); // the session layer logs through `log`; RUST_LOG=warn shows it
    let url = DatabaseUrl::parse(&std::env::var("DATABASE_URL").map_err(|_| "set DATABASE_URL")?)?;
    let port: u16 = std::env::var("PORT").map_or(Ok(8080), |p| p.parse())?;
    // A pool per Actix worker, each driven on its worker: one worker per CPU, but no more
    // than the pool can give MIN_WORKER_SHARE connections each after the application's own.
    let mut config = SessionConfig::default();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = cpus.min(config.max_worker_pools(false)).max(1);
    config.worker_pools = workers;
    let db = Database::builder(url, config).build()?;
    diesel::sql_query(
        "CREATE TABLE IF NOT EXISTS notes (id bigserial PRIMARY KEY, body text NOT NULL)",
    )
    .execute(&mut *db.pool().get().await?)
    .await?;

    let app_db = db.clone();
    // The session middleware goes on each resource, innermost.
    HttpServer::new(move || {
        App::new()
            .service(
                web::resource("/notes")
                    .route(web::post().to(create))
                    .wrap(app_db.middleware()),
            )
            .service(
                web::resource("/notes/{id}")
                    .route(web::get().to(show))
                    .wrap(app_db.middleware()),
            )
    })
    .workers(workers)
    .bind(("127.0.0.1", port))?
    .run() // until Ctrl-C or SIGTERM, then finishes the requests in flight
    .await?;
    // Requests a shutdown timeout cut off cancel their statements on the way out.
    db.shut_down(std::time::Duration::from_secs(2)).await;
    Ok(())
}
