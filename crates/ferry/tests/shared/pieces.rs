//! What both log captures (PostgreSQL, MariaDB) must hand out for two large transactions
//! read in pieces of 100, one committed before the relay said it drained the table (250
//! messages) and one after (300). Included by the `pg_capture` and `mysql_capture` tests.

use ferry::CapturedPiece;

/// Full pieces as soon as they are read, the end on the last piece only (an empty one when
/// the transaction filled the one before), and `maybe_published` only before the drain.
pub(crate) fn assert_pieces_around_the_drain(
    before_drain: &[CapturedPiece],
    after_drain: &[CapturedPiece],
) {
    let sizes = |pieces: &[CapturedPiece]| -> Vec<usize> {
        pieces.iter().map(|piece| piece.messages.len()).collect()
    };
    assert_eq!(sizes(before_drain), [100, 100, 50]);
    assert_eq!(
        sizes(after_drain),
        [100, 100, 100, 0],
        "a full piece as soon as it is read, the end after it"
    );
    for pieces in [before_drain, after_drain] {
        let (last, earlier) = pieces.split_last().expect("pieces");
        assert!(last.end.is_some() && earlier.iter().all(|piece| piece.end.is_none()));
    }
    assert!(before_drain.iter().all(|piece| piece.maybe_published));
    assert!(after_drain.iter().all(|piece| !piece.maybe_published));
}
