-- The procedure `ferry migrate` installs for producers in any language.
CALL {p}enqueue($1, $2, $3, $4, $5, $6, $7)
