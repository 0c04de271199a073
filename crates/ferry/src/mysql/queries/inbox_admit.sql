-- The procedure `ferry migrate` installs for consumers in any language.
CALL {p}inbox_admit($1, $2, $3, $4, $5)
