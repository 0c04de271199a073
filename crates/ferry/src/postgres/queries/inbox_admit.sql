-- The function `ferry migrate` installs for consumers in any language.
SELECT decision, last_version FROM {p}inbox_admit($1, $2, $3, $4, $5)
