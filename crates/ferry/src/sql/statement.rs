//! Statements rendered once for a store, and bound with one argument list whatever the
//! driver's placeholder syntax.
//!
//! Every dialect writes its SQL with `$1`, `$2`, … (PostgreSQL's syntax); rendering turns
//! them into the dialect's own: `?1` for SQLite, and for MySQL a plain `?` per occurrence,
//! remembering which argument each takes, so a statement may use an argument twice. A list
//! of message ids is bound the dialect's way: one array (PostgreSQL), one JSON text
//! (SQLite), or one `?` per id (MySQL, in statements prepared for sizes that are powers of
//! two, so that a dozen cached statements serve every batch size).

use std::sync::Arc;

use sqlx::types::Json;
use sqlx::{AssertSqlSafe, SqlSafeStr, SqlStr};
use uuid::Uuid;

use ferry_core::{Headers, StoreError};

use super::dialect::Dialect;
use super::driver::{Bind, Exec, SqlQuery};
use super::error::store_error;
use super::outbox::Connection;

type Row<D> = <<D as Dialect>::Db as sqlx::Database>::Row;

/// How a dialect writes bind parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placeholders {
    /// `$1`, `$2`, … as written (PostgreSQL).
    Dollar,
    /// `?1`, `?2`, … (SQLite).
    Numbered,
    /// `?` bound in order of appearance (MySQL).
    Positional,
}

/// One argument of a statement.
#[derive(Debug, Clone, Copy)]
pub enum Arg<'a> {
    Int(i64),
    OptInt(Option<i64>),
    Float(f64),
    Bool(bool),
    Text(&'a str),
    OptText(Option<&'a str>),
    Bytes(&'a [u8]),
    Id(Uuid),
    OptId(Option<Uuid>),
    /// Bound as JSON.
    Headers(&'a Headers),
    /// A list of message ids, bound as [`Dialect::bind_ids`] says.
    Ids(&'a [Uuid]),
}

impl From<i64> for Arg<'_> {
    fn from(value: i64) -> Self {
        Self::Int(value)
    }
}

impl From<u32> for Arg<'_> {
    fn from(value: u32) -> Self {
        Self::Int(value.into())
    }
}

impl From<bool> for Arg<'_> {
    fn from(value: bool) -> Self {
        Self::Bool(value)
    }
}

impl<'a> From<&'a str> for Arg<'a> {
    fn from(value: &'a str) -> Self {
        Self::Text(value)
    }
}

impl<'a> From<&'a String> for Arg<'a> {
    fn from(value: &'a String) -> Self {
        Self::Text(value)
    }
}

impl<'a> From<Option<&'a str>> for Arg<'a> {
    fn from(value: Option<&'a str>) -> Self {
        Self::OptText(value)
    }
}

impl From<Uuid> for Arg<'_> {
    fn from(value: Uuid) -> Self {
        Self::Id(value)
    }
}

/// A rendered statement.
#[derive(Debug, Clone)]
pub struct Statement {
    sql: SqlStr,
    /// For positional placeholders, the argument number (1-based) each `?` takes.
    slots: Option<Arc<[u8]>>,
}

impl Statement {
    /// Renders `text` for `placeholders`: drops comment lines (`-- …`), replaces each
    /// `(name, text)` of `fills`, then converts `$n` parameters. With `list_size`, argument
    /// `$n = list.0` is a list of `list.1` values and gets as many positional `?`.
    pub fn render(
        text: &str,
        fills: &[(&str, &str)],
        placeholders: Placeholders,
        list: Option<(u8, usize)>,
    ) -> Self {
        let code: Vec<&str> = text
            .lines()
            .filter(|line| !line.trim_start().starts_with("--"))
            .collect();
        let code = fills
            .iter()
            .fold(code.join("\n"), |sql, (name, fill)| sql.replace(name, fill));
        let mut sql = String::with_capacity(code.len());
        let mut slots = Vec::new();
        let mut rest = code.as_str();
        while let Some(at) = rest.find('$') {
            sql.push_str(&rest[..at]);
            let after = &rest[at + 1..];
            let digits = after.bytes().take_while(u8::is_ascii_digit).count();
            let Ok(number) = after[..digits].parse::<u8>() else {
                sql.push('$');
                rest = after;
                continue;
            };
            match placeholders {
                Placeholders::Dollar => sql.push_str(&rest[at..at + 1 + digits]),
                Placeholders::Numbered => {
                    sql.push('?');
                    sql.push_str(&after[..digits]);
                }
                Placeholders::Positional => {
                    let count = match list {
                        Some((list_arg, size)) if list_arg == number => size,
                        _ => 1,
                    };
                    for i in 0..count {
                        sql.push_str(if i == 0 { "?" } else { ", ?" });
                        slots.push(number);
                    }
                }
            }
            rest = &after[digits..];
        }
        sql.push_str(rest);
        Self {
            // Safe to splice: the texts are ferry's own constants and the fills its own
            // constants or a validated table prefix; values are always bound.
            sql: AssertSqlSafe(Arc::<str>::from(sql)).into_sql_str(),
            slots: (placeholders == Placeholders::Positional).then(|| slots.into()),
        }
    }

    pub fn sql(&self) -> &str {
        self.sql.as_str()
    }

    /// The statement with `args` bound (`args[0]` is `$1`).
    pub fn query<D: Dialect>(&self, args: &[Arg<'_>]) -> SqlQuery<D::Db> {
        let query = sqlx::query(self.sql.clone());
        match &self.slots {
            None => args.iter().fold(query, |query, arg| bind::<D>(query, *arg)),
            Some(slots) => {
                // How many values of each list argument were bound so far.
                let mut taken = vec![0usize; args.len()];
                slots.iter().fold(query, |query, &slot| {
                    let index = usize::from(slot) - 1;
                    match args.get(index) {
                        Some(Arg::Ids(ids)) => {
                            // Padding repeats the last id: `IN` ignores repeats.
                            let id = ids[taken[index].min(ids.len().saturating_sub(1))];
                            taken[index] += 1;
                            <D::Db as Bind<Uuid>>::bind_value(query, id)
                        }
                        Some(arg) => bind::<D>(query, *arg),
                        // A missing argument fails the statement: the driver counts them.
                        None => query,
                    }
                })
            }
        }
    }
}

/// Running a statement on a connection (of a pool or a transaction), its errors mapped
/// with [`store_error`].
impl Statement {
    /// Runs it; returns how many rows it changed (or matched).
    pub async fn execute<D: Dialect>(
        &self,
        conn: &mut Connection<D>,
        args: &[Arg<'_>],
    ) -> Result<u64, StoreError> {
        let result = <D::Db as Exec>::execute(conn, self.query::<D>(args))
            .await
            .map_err(store_error::<D>)?;
        Ok(D::rows_affected(&result))
    }

    pub async fn fetch_all<D: Dialect>(
        &self,
        conn: &mut Connection<D>,
        args: &[Arg<'_>],
    ) -> Result<Vec<Row<D>>, StoreError> {
        <D::Db as Exec>::fetch_all(conn, self.query::<D>(args))
            .await
            .map_err(store_error::<D>)
    }

    pub async fn fetch_optional<D: Dialect>(
        &self,
        conn: &mut Connection<D>,
        args: &[Arg<'_>],
    ) -> Result<Option<Row<D>>, StoreError> {
        <D::Db as Exec>::fetch_optional(conn, self.query::<D>(args))
            .await
            .map_err(store_error::<D>)
    }

    /// The one row a statement always returns.
    pub async fn fetch_one<D: Dialect>(
        &self,
        conn: &mut Connection<D>,
        args: &[Arg<'_>],
    ) -> Result<Row<D>, StoreError> {
        self.fetch_optional::<D>(conn, args)
            .await?
            .ok_or_else(|| StoreError::Other(format!("no row returned by: {}", self.sql()).into()))
    }
}

fn bind<D: Dialect>(query: SqlQuery<D::Db>, arg: Arg<'_>) -> SqlQuery<D::Db> {
    type Db<D> = <D as Dialect>::Db;
    match arg {
        Arg::Int(v) => <Db<D> as Bind<i64>>::bind_value(query, v),
        Arg::OptInt(v) => <Db<D> as Bind<Option<i64>>>::bind_value(query, v),
        Arg::Float(v) => <Db<D> as Bind<f64>>::bind_value(query, v),
        Arg::Bool(v) => <Db<D> as Bind<bool>>::bind_value(query, v),
        Arg::Text(v) => <Db<D> as Bind<&str>>::bind_value(query, v),
        // An optional text is bound owned: sqlx binds `Option<T>` only for `T: 't` over
        // every lifetime `'t` it encodes with.
        Arg::OptText(v) => <Db<D> as Bind<Option<String>>>::bind_value(query, v.map(str::to_owned)),
        Arg::Bytes(v) => <Db<D> as Bind<&[u8]>>::bind_value(query, v),
        Arg::Id(v) => <Db<D> as Bind<Uuid>>::bind_value(query, v),
        Arg::OptId(v) => <Db<D> as Bind<Option<Uuid>>>::bind_value(query, v),
        Arg::Headers(v) => <Db<D> as Bind<Json<&Headers>>>::bind_value(query, Json(v)),
        Arg::Ids(ids) => D::bind_ids(query, ids),
    }
}

/// A statement with a list of ids, in the sizes the dialect needs: one statement where
/// the list is one value, one per power of two up to [`Dialect::MAX_IDS_PER_STATEMENT`]
/// where it is one placeholder per id.
#[derive(Debug, Clone)]
pub struct IdListStatement {
    by_size: Vec<Statement>,
}

impl IdListStatement {
    /// `list_arg` is the number of the `$n` argument holding the ids.
    pub fn render<D: Dialect>(text: &str, fills: &[(&str, &str)], list_arg: u8) -> Self {
        let by_size = if D::PLACEHOLDERS == Placeholders::Positional {
            (0..=D::MAX_IDS_PER_STATEMENT.trailing_zeros())
                .map(|power| {
                    Statement::render(text, fills, D::PLACEHOLDERS, Some((list_arg, 1 << power)))
                })
                .collect()
        } else {
            vec![Statement::render(text, fills, D::PLACEHOLDERS, None)]
        };
        Self { by_size }
    }

    /// The statement for `n` ids (1 to [`Dialect::MAX_IDS_PER_STATEMENT`]).
    pub fn for_ids(&self, n: usize) -> &Statement {
        let size = n.max(1).next_power_of_two();
        let index = (size.trailing_zeros() as usize).min(self.by_size.len() - 1);
        &self.by_size[index]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rendered(text: &str, placeholders: Placeholders) -> (String, Option<Vec<u8>>) {
        let statement = Statement::render(text, &[("{p}", "x_")], placeholders, None);
        (
            statement.sql().to_owned(),
            statement.slots.map(|s| s.to_vec()),
        )
    }

    #[test]
    fn placeholders_follow_the_dialect() {
        let text = "-- a comment with $9\nSELECT $2, '$[0]' FROM {p}t WHERE a = $1 OR b = $2";
        assert_eq!(
            rendered(text, Placeholders::Dollar),
            (
                "SELECT $2, '$[0]' FROM x_t WHERE a = $1 OR b = $2".into(),
                None
            )
        );
        assert_eq!(
            rendered(text, Placeholders::Numbered).0,
            "SELECT ?2, '$[0]' FROM x_t WHERE a = ?1 OR b = ?2"
        );
        assert_eq!(
            rendered(text, Placeholders::Positional),
            (
                "SELECT ?, '$[0]' FROM x_t WHERE a = ? OR b = ?".into(),
                Some(vec![2, 1, 2])
            )
        );
    }

    #[test]
    fn positional_lists_expand_to_their_size() {
        let statement = Statement::render(
            "DELETE FROM t WHERE p = $1 AND id IN ($2)",
            &[],
            Placeholders::Positional,
            Some((2, 4)),
        );
        assert_eq!(
            statement.sql(),
            "DELETE FROM t WHERE p = ? AND id IN (?, ?, ?, ?)"
        );
        assert_eq!(statement.slots.as_deref(), Some(&[1, 2, 2, 2, 2][..]));
    }
}
