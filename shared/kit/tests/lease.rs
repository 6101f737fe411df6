//! Acceptance tests of SQL leases on SQLite, PostgreSQL and MariaDB: two replicas racing for one lease for a
//! minute are never both holders (by the holding intervals they record and by a counter only fenced writes
//! change), a killed holder is replaced, and a write fenced with an old epoch fails.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cube_kit::lease::{self, Epoch, Held, Keeper, Lease, LeaseError};
use sea_orm::sea_query::{ColumnDef, Table};
use sea_orm::{ConnectionTrait as _, DatabaseConnection, Statement, TransactionTrait as _, Value};
use sea_orm_migration::{MigrationTrait, MigratorTrait};
use tokio::time::Instant;

/// How long a holding lasts without renewal.
const LEASE: Duration = Duration::from_secs(2);
/// How long the replicas race.
const RACE: Duration = Duration::from_secs(60);
/// The lease the replicas want.
const NAME: &str = "race";

/// The test's migrator: the lease table alone.
struct Migrator;

impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![lease::migration()]
    }
}

async fn connect(url: &str, migrate: bool) -> DatabaseConnection {
    cube_kit::db::connect::<Migrator>(url, migrate)
        .await
        .expect("connect to the test database")
}

fn statement(db: &DatabaseConnection, sql: &str, values: Vec<Value>) -> Statement {
    let backend = db.get_database_backend();
    let sql = if backend == sea_orm::DbBackend::Postgres {
        sql.replacen('?', "$1", 1).replacen('?', "$2", 1)
    } else {
        sql.to_owned()
    };
    Statement::from_sql_and_values(backend, sql, values)
}

/// Creates the table the fenced writes change: one counter, and the epoch of the last write.
async fn create_counter(db: &DatabaseConnection) {
    db.execute(
        &Table::create()
            .table("fenced_counter")
            .col(ColumnDef::new("id").integer().not_null().primary_key())
            .col(ColumnDef::new("value").big_integer().not_null())
            .col(ColumnDef::new("last_epoch").big_integer().not_null())
            .to_owned(),
    )
    .await
    .expect("create the counter");
    db.execute_unprepared("INSERT INTO fenced_counter (id, value, last_epoch) VALUES (1, 0, 0)")
        .await
        .expect("insert the counter");
}

/// Reads the counter: its value and the epoch of its last write.
async fn counter(db: &impl sea_orm::ConnectionTrait) -> Result<(i64, i64), sea_orm::DbErr> {
    let row = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT value, last_epoch FROM fenced_counter WHERE id = 1",
        ))
        .await?
        .ok_or_else(|| sea_orm::DbErr::RecordNotFound("the counter".into()))?;
    Ok((row.try_get_by_index(0)?, row.try_get_by_index(1)?))
}

/// Why a fenced write did not happen.
#[derive(Debug)]
enum WriteError {
    Fenced(LeaseError),
    Database(sea_orm::DbErr),
}

/// Increments the counter in a transaction that first checks the lease is held at `epoch`; returns the epoch of
/// the previous write.
async fn fenced_write(db: &DatabaseConnection, epoch: Epoch) -> Result<i64, WriteError> {
    let txn = db.begin().await.map_err(WriteError::Database)?;
    lease::check(&txn, NAME, epoch).await.map_err(WriteError::Fenced)?;
    let (value, last_epoch) = counter(&txn).await.map_err(WriteError::Database)?;
    txn.execute_raw(statement(
        db,
        "UPDATE fenced_counter SET value = ?, last_epoch = ? WHERE id = 1",
        vec![(value + 1).into(), epoch.0.into()],
    ))
    .await
    .map_err(WriteError::Database)?;
    txn.commit().await.map_err(WriteError::Database)?;
    Ok(last_epoch)
}

/// A span of time during which one replica believed it held the lease at one epoch.
#[derive(Clone, Copy, Debug)]
struct Holding {
    replica: usize,
    epoch: Epoch,
    start: Instant,
    end: Instant,
}

/// What the replicas observed, shared between them.
#[derive(Default)]
struct Log {
    holdings: Vec<Holding>,
    /// Fenced writes that committed.
    writes: i64,
    /// Fenced writes that found a newer epoch had already written: a deposed holder acting.
    stale_writes: Vec<(Epoch, i64)>,
    /// Fenced writes the database refused.
    failed_writes: Vec<String>,
}

fn random_below(n: u64) -> u64 {
    // Random enough for varying the replicas' rhythm, without another dependency.
    u64::try_from(uuid::Uuid::new_v4().as_u128() % u128::from(n)).unwrap_or(0)
}

/// Records that `replica` holds `held` at `now`, extending its holding `current` when the epoch is the same;
/// returns the index of the holding.
fn record(log: &Mutex<Log>, current: Option<usize>, replica: usize, held: Held, now: Instant) -> usize {
    let mut log = log.lock().expect("log");
    let index = match current {
        Some(index) if log.holdings[index].epoch == held.epoch => index,
        _ => {
            log.holdings.push(Holding {
                replica,
                epoch: held.epoch,
                start: now,
                end: held.valid_until,
            });
            log.holdings.len() - 1
        }
    };
    let holding = &mut log.holdings[index];
    holding.end = holding.end.max(held.valid_until);
    index
}

/// One replica: in generations, keeps the lease, acts under it while it holds it, then either releases it or
/// "crashes" (stops without releasing), until `until`.
async fn replica(replica: usize, db: DatabaseConnection, log: Arc<Mutex<Log>>, until: Instant) {
    let mut generation = 0;
    while Instant::now() < until {
        generation += 1;
        let keeper = Lease::new(NAME, format!("replica-{replica}-{generation}"), LEASE).keep(db.clone());
        let state = keeper.watch();
        let stop = (Instant::now() + Duration::from_millis(1000 + random_below(5000))).min(until);
        let mut current: Option<usize> = None;
        while Instant::now() < stop {
            let held = *state.borrow();
            let now = Instant::now();
            match held.filter(|held| now < held.valid_until) {
                Some(held) => {
                    current = Some(record(&log, current, replica, held, now));
                    match fenced_write(&db, held.epoch).await {
                        Ok(last_epoch) => {
                            let mut log = log.lock().expect("log");
                            log.writes += 1;
                            if last_epoch > held.epoch.0 {
                                log.stale_writes.push((held.epoch, last_epoch));
                            }
                        }
                        // A holding can end between the look and the write; the fence refuses it.
                        Err(WriteError::Fenced(_)) => {}
                        // SQLite refuses a transaction that read before another committed; it simply fails.
                        Err(WriteError::Database(error)) => {
                            log.lock().expect("log").failed_writes.push(error.to_string())
                        }
                    }
                }
                None => current = None,
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if random_below(2) == 0 {
            // Stops acting before the lease is handed over, so the holding ends now.
            if let Some(index) = current {
                let mut log = log.lock().expect("log");
                let holding = &mut log.holdings[index];
                holding.end = holding.end.min(Instant::now());
            }
            let _ = keeper.release().await;
        } else {
            drop(keeper);
        }
        tokio::time::sleep(Duration::from_millis(random_below(500))).await;
    }
}

/// Asserts that holdings at different epochs never overlap, and returns how many epochs were held.
fn assert_exclusive(holdings: &[Holding]) -> usize {
    let mut by_epoch: BTreeMap<Epoch, Holding> = BTreeMap::new();
    for holding in holdings {
        by_epoch
            .entry(holding.epoch)
            .and_modify(|merged| {
                assert_eq!(merged.replica, holding.replica, "one epoch, one holder");
                merged.start = merged.start.min(holding.start);
                merged.end = merged.end.max(holding.end);
            })
            .or_insert(*holding);
    }
    let mut spans: Vec<Holding> = by_epoch.into_values().collect();
    spans.sort_by_key(|holding| holding.start);
    for pair in spans.windows(2) {
        let (earlier, later) = (pair[0], pair[1]);
        assert!(
            earlier.end <= later.start,
            "two holders at once: {earlier:?} and {later:?}"
        );
        assert!(
            earlier.epoch < later.epoch,
            "epochs grow with each new holder: {earlier:?} then {later:?}"
        );
    }
    spans.len()
}

/// Two replicas race for the lease for a minute, each with a connection pool of its own.
async fn two_replicas_never_hold_at_once(url: &str) {
    let setup = connect(url, true).await;
    create_counter(&setup).await;
    let log = Arc::new(Mutex::new(Log::default()));
    let until = Instant::now() + RACE;
    let mut replicas = Vec::new();
    for index in 0..2 {
        let db = connect(url, false).await;
        replicas.push(tokio::spawn(replica(index, db, log.clone(), until)));
    }
    for replica in replicas {
        replica.await.expect("the replica finishes");
    }
    let (value, _) = counter(&setup).await.expect("the counter");
    let log = log.lock().expect("log");
    assert!(
        log.stale_writes.is_empty(),
        "deposed holders wrote: {:?}",
        log.stale_writes
    );
    assert_eq!(value, log.writes, "every committed fenced write counted once");
    assert!(log.writes > 0, "the holders wrote");
    let epochs = assert_exclusive(&log.holdings);
    eprintln!(
        "{epochs} epochs, {} fenced writes committed, {} refused by the database (first: {:?})",
        log.writes,
        log.failed_writes.len(),
        log.failed_writes.first()
    );
    assert!(epochs >= 2, "the lease changed hands during the race ({epochs} epochs)");
}

/// Waits until `keeper` reports a holding.
async fn held(keeper: &Keeper) -> Epoch {
    let mut state = keeper.watch();
    let held = tokio::time::timeout(LEASE * 10, state.wait_for(Option::is_some))
        .await
        .expect("the lease is taken in time")
        .expect("the keeper runs");
    (*held).map(|held| held.epoch).expect("held")
}

/// Set in the child process of [`killed_holder_is_replaced_and_fenced`]: the database it takes the lease in.
const CHILD_DATABASE: &str = "CUBE_TEST_LEASE_CHILD_DATABASE";
/// What the child prints, followed by its epoch, once it holds the lease.
const HOLDING: &str = "holding at epoch ";

/// Acts as the first replica of [`killed_holder_is_replaced_and_fenced`] when that test runs this binary with
/// [`CHILD_DATABASE`] set: takes and keeps the lease, says so, and waits to be killed. Does nothing otherwise.
#[test]
fn lease_holder_process() {
    let Ok(url) = std::env::var(CHILD_DATABASE) else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let keeper = Lease::new(NAME, "first", LEASE).keep(connect(&url, false).await);
        let epoch = held(&keeper).await;
        println!("\n{HOLDING}{}", epoch.0);
        // Keeps renewing until the parent kills this process with SIGKILL.
        std::future::pending::<()>().await;
    });
}

/// The holder's process is killed with SIGKILL (it neither releases nor renews); the other replica takes over,
/// and a write fenced with the dead holder's epoch fails while one with the new epoch succeeds.
async fn killed_holder_is_replaced_and_fenced(url: &str) {
    use tokio::io::AsyncBufReadExt as _;

    let setup = connect(url, true).await;
    create_counter(&setup).await;
    let mut child = tokio::process::Command::new(std::env::current_exe().expect("the test binary"))
        .args(["lease_holder_process", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_DATABASE, url)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("starting the holder's process");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let old = tokio::time::timeout(LEASE * 10, async {
        while let Some(line) = lines.next_line().await.expect("reading the child") {
            if let Some(epoch) = line.strip_prefix(HOLDING) {
                return Epoch(epoch.trim().parse().expect("an epoch"));
            }
        }
        panic!("the holder's process ended before holding the lease");
    })
    .await
    .expect("the child takes the lease");
    let second = Lease::new(NAME, "second", LEASE).keep(connect(url, false).await);
    fenced_write(&setup, old).await.expect("the holder's write passes");
    // A few renewal periods: the live holder keeps the lease from the second replica.
    tokio::time::sleep(LEASE).await;
    assert_eq!(second.current(), None, "the lease has one holder while it lives");
    // A loop on the second replica gets no tick while it does not hold the lease, woken or not.
    let wake = tokio::sync::Notify::new();
    wake.notify_one();
    let idle = tokio::time::timeout(LEASE / 2, second.tick(&wake, Duration::from_millis(50))).await;
    assert!(idle.is_err(), "a tick without the lease: {idle:?}");

    child.kill().await.expect("kill -9 the holder");
    let new = held(&second).await;
    assert!(new > old, "a new holder, a new epoch: {old} then {new}");
    wake.notify_one();
    let woken = tokio::time::timeout(LEASE, second.tick(&wake, Duration::from_secs(3600)))
        .await
        .expect("a wake ticks at once, long before the interval");
    assert_eq!(woken, new, "the tick carries the epoch held");
    match fenced_write(&setup, old).await {
        Err(WriteError::Fenced(LeaseError::Superseded { held, current, .. })) => {
            assert_eq!((held, current), (old, Some(new)));
        }
        other => panic!("a write fenced with the old epoch must fail as superseded, got {other:?}"),
    }
    assert_eq!(fenced_write(&setup, new).await.expect("the new holder's write"), old.0);

    second.release().await.expect("release");
    match lease::check(&setup, NAME, new).await {
        Err(LeaseError::Superseded { current: None, .. }) => {}
        other => panic!("a released lease fences its last epoch, got {other:?}"),
    }
}

/// A holding that is not renewed expires, and the fence then refuses its epoch.
async fn unrenewed_lease_expires(url: &str) {
    let db = connect(url, true).await;
    let lease = Lease::new(NAME, "once", Duration::from_millis(300));
    let epoch = lease
        .acquire_or_renew(&db)
        .await
        .expect("acquire")
        .expect("a free lease is taken");
    lease::check(&db, NAME, epoch).await.expect("held");
    cube_testkit::eventually("the holding to expire", LEASE * 10, || async {
        matches!(lease::check(&db, NAME, epoch).await, Err(LeaseError::Expired { .. })).then_some(())
    })
    .await;
    let other = Lease::new(NAME, "other", LEASE);
    let taken = other
        .acquire_or_renew(&db)
        .await
        .expect("acquire")
        .expect("an expired lease is taken");
    assert!(taken > epoch);
    assert_eq!(
        lease.acquire_or_renew(&db).await.expect("try"),
        None,
        "held by the other"
    );
}

cube_testkit::on_every_backend!(
    two_replicas_never_hold_at_once,
    killed_holder_is_replaced_and_fenced,
    unrenewed_lease_expires,
);
