//! What ferry's SQL code needs from a sqlx driver, proven once.
//!
//! sqlx implements binding, decoding and executing per driver, so code generic over
//! [`sqlx::Database`] would have to restate a dozen bounds (`i64: Encode<DB>`, `for<'c> &'c
//! mut DB::Connection: Executor<'c>`, …) on every function. Here each capability is a small
//! trait of the database type with a blanket impl that states those bounds once; [`Driver`]
//! gathers them as supertraits, which Rust carries to every use: a function generic over
//! `DB: Driver` binds, reads and executes without further bounds.

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use sqlx::IntoArguments;
use sqlx::query::Query;
use sqlx::types::Json;
use sqlx::{ColumnIndex, Database, Decode, Encode, Executor, Row, SqlStr, Type};
use uuid::Uuid;

use ferry_core::Headers;

/// A statement with its arguments, for driver `DB`.
pub type SqlQuery<DB> = Query<'static, DB, <DB as Database>::Arguments>;

/// Binds a value of type `T`.
pub trait Bind<T>: Database {
    fn bind_value(query: SqlQuery<Self>, value: T) -> SqlQuery<Self>;
}

impl<DB: Database, T> Bind<T> for DB
where
    T: for<'t> Encode<'t, DB> + Type<DB>,
{
    fn bind_value(query: SqlQuery<Self>, value: T) -> SqlQuery<Self> {
        query.bind(value)
    }
}

/// Reads a column as a value of type `T`, by name or (where rows are many and their columns
/// fixed, as a fetch's) by position, which spares a lookup of the name per value.
pub trait Get<T>: Database {
    fn get_value(row: &Self::Row, column: &str) -> Result<T, sqlx::Error>;

    fn get_at(row: &Self::Row, index: usize) -> Result<T, sqlx::Error>;
}

impl<DB: Database, T> Get<T> for DB
where
    T: for<'r> Decode<'r, DB> + Type<DB>,
    for<'a> &'a str: ColumnIndex<DB::Row>,
    usize: ColumnIndex<DB::Row>,
{
    fn get_value(row: &Self::Row, column: &str) -> Result<T, sqlx::Error> {
        row.try_get(column)
    }

    fn get_at(row: &Self::Row, index: usize) -> Result<T, sqlx::Error> {
        row.try_get(index)
    }
}

/// Runs statements on a connection (of a pool or a transaction).
pub trait Exec: Database {
    fn execute(
        conn: &mut Self::Connection,
        query: SqlQuery<Self>,
    ) -> BoxFuture<'_, Result<Self::QueryResult, sqlx::Error>>;

    fn fetch_all(
        conn: &mut Self::Connection,
        query: SqlQuery<Self>,
    ) -> BoxFuture<'_, Result<Vec<Self::Row>, sqlx::Error>>;

    fn fetch_optional(
        conn: &mut Self::Connection,
        query: SqlQuery<Self>,
    ) -> BoxFuture<'_, Result<Option<Self::Row>, sqlx::Error>>;

    /// Runs `sql`, which may hold several statements and no parameters (a migration).
    fn execute_script(
        conn: &mut Self::Connection,
        sql: SqlStr,
    ) -> BoxFuture<'_, Result<Self::QueryResult, sqlx::Error>>;
}

impl<DB: Database> Exec for DB
where
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    DB::Arguments: IntoArguments<DB>,
{
    fn execute(
        conn: &mut Self::Connection,
        query: SqlQuery<Self>,
    ) -> BoxFuture<'_, Result<Self::QueryResult, sqlx::Error>> {
        conn.execute(query)
    }

    fn fetch_all(
        conn: &mut Self::Connection,
        query: SqlQuery<Self>,
    ) -> BoxFuture<'_, Result<Vec<Self::Row>, sqlx::Error>> {
        conn.fetch_all(query)
    }

    fn fetch_optional(
        conn: &mut Self::Connection,
        query: SqlQuery<Self>,
    ) -> BoxFuture<'_, Result<Option<Self::Row>, sqlx::Error>> {
        conn.fetch_optional(query)
    }

    fn execute_script(
        conn: &mut Self::Connection,
        sql: SqlStr,
    ) -> BoxFuture<'_, Result<Self::QueryResult, sqlx::Error>> {
        conn.execute(sqlx::raw_sql(sql))
    }
}

/// A sqlx driver with every capability ferry's SQL stores use: the value types they bind
/// and read, and statement execution. PostgreSQL, MySQL and SQLite all have them; each
/// dialect's module says so with an empty impl, which the compiler checks.
pub trait Driver:
    Exec
    + Bind<i64>
    + Bind<Option<i64>>
    + Bind<f64>
    + Bind<bool>
    + for<'a> Bind<&'a str>
    + Bind<Option<String>>
    + for<'a> Bind<&'a [u8]>
    + Bind<Uuid>
    + Bind<Option<Uuid>>
    + for<'a> Bind<Json<&'a Headers>>
    + Get<i32>
    + Get<i64>
    + Get<Option<i64>>
    + Get<f64>
    + Get<Option<f64>>
    + Get<bool>
    + Get<String>
    + Get<Option<String>>
    + Get<Vec<u8>>
    + Get<Option<Vec<u8>>>
    + Get<Uuid>
    + Get<Json<Headers>>
    + Get<DateTime<Utc>>
    + Get<Option<DateTime<Utc>>>
{
}

/// Reads columns by name from a row of any [`Driver`].
pub trait RowExt {
    type Db: Database;

    /// The column `name` as a `T`.
    fn col<T>(&self, name: &str) -> Result<T, sqlx::Error>
    where
        Self::Db: Get<T>;

    /// The column at `index` as a `T`.
    fn col_at<T>(&self, index: usize) -> Result<T, sqlx::Error>
    where
        Self::Db: Get<T>;
}

impl<R: Row> RowExt for R {
    type Db = R::Database;

    fn col<T>(&self, name: &str) -> Result<T, sqlx::Error>
    where
        Self::Db: Get<T>,
    {
        <Self::Db as Get<T>>::get_value(self, name)
    }

    fn col_at<T>(&self, index: usize) -> Result<T, sqlx::Error>
    where
        Self::Db: Get<T>,
    {
        <Self::Db as Get<T>>::get_at(self, index)
    }
}
