# Sourced by setup.sh and setup-lab.sh: what apt says is decided on once, and only on fresh lists.
# A fresh machine's lists can be weeks old and name kernel ABIs the mirror has since dropped:
# choosing from them, then updating, then choosing again installs one package and looks for
# another (issue 16).

# A package counts as installed only when dpkg says "install ok installed": a removed package's
# leftover configuration ("config-files") does not.
installed() { [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]; }

# apt_fresh STAMP [APT_OPTION...]: `apt-get update` (with those options) unless STAMP shows one
# in the last 24 hours. Call it before anything is chosen from `apt-cache`.
apt_fresh() {
  local stamp=$1; shift
  [ -e "$stamp" ] && [ -z "$(find "$stamp" -mmin +1440)" ] && return 0
  apt-get "$@" update -qq
  mkdir -p "$(dirname "$stamp")" && touch "$stamp"
}

# pick_headers: `apt-cache depends linux-headers-amd64` on stdin -> the headers package of the
# suite's own kernel, as Debian's meta-package names it (6.1.0-N on bookworm, not its 6.12
# backports; 6.12.x+debN on trixie). The ABI number moves between weeks: looked up, never written.
pick_headers() {
  awk '$1 == "Depends:" && $2 ~ /^linux-headers-.*-amd64$/ {print $2; exit}'
}
