# Sourced by the scripts that run a Python tool from PyPI: `venv_tool NAME VERSION` puts
# NAME==VERSION into the project's venv (FERRY_SERVICES_VENV, default /opt/ferry-venv,
# made if missing) unless that version is there, and prints the tool's path.
venv_tool() {
  local name=$1 version=$2
  local venv=${FERRY_SERVICES_VENV:-/opt/ferry-venv}
  if ! "$venv/bin/$name" --version 2>/dev/null | grep -q "$version"; then
    echo "installing $name $version into $venv" >&2
    [ -x "$venv/bin/pip" ] || python3 -m venv "$venv"
    "$venv/bin/pip" install -q "$name==$version" >&2
  fi
  echo "$venv/bin/$name"
}
