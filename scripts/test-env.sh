#!/usr/bin/env bash
# Starts, on loopback, the real dependencies Cube's tests talk to, and writes where they are to .cube-test/env.
#
#   scripts/test-env.sh up [COMPONENT ...]                              start (or reuse) everything, or only those named:
#                                                                       postgres, mysql, redis, ldap, kubernetes, prometheus
#   scripts/test-env.sh down                                            stop what this script started
#   scripts/test-env.sh env                                             print the settings tests read
#   scripts/test-env.sh status                                          say what is running
#   scripts/test-env.sh purge                                           down, then delete all state (data, ports, logs)
#   scripts/test-env.sh build-kube                                      only build (or find) the cached Kubernetes binaries
#
# PostgreSQL, MariaDB and Redis are the machine's own services on their standard ports (installed and started from
# Debian when they do not answer); `down` leaves them alone. OpenLDAP and the Kubernetes control plane (etcd,
# kube-apiserver, kube-controller-manager, kube-scheduler) are our own processes on free loopback ports, with their
# state under .cube-test/. Prometheus is only installed (its binary, from Debian, its system service never started):
# tests start their own servers. See ARCHITECTURE.md §8.
#
# Settings written (KEY=value lines, read by cube-testkit): CUBE_TEST_POSTGRES_URL, CUBE_TEST_MYSQL_URL,
# CUBE_TEST_REDIS_URL, CUBE_TEST_LDAP_URL (plain, and StartTLS), CUBE_TEST_LDAPS_URL, CUBE_TEST_LDAP_CA_FILE (the PEM
# CA that signed slapd's certificate, for 127.0.0.1 and localhost), CUBE_TEST_LDAP_BASE_DN, CUBE_TEST_LDAP_ADMIN_DN,
# CUBE_TEST_LDAP_ADMIN_PASSWORD, CUBE_TEST_LDAP_<UID>_PASSWORD for each user of scripts/test-env/seed.ldif, and
# CUBE_TEST_KUBECONFIG (a kubeconfig for a system:masters token), CUBE_TEST_KUBECONFIG_B (the same for a second
# cluster: another API server, sharing etcd under its own prefix, with no scheduler), and for tests that start (and
# restart) an API server of their own: CUBE_TEST_KUBE_APISERVER (the binary), CUBE_TEST_ETCD_URL and
# CUBE_TEST_KUBE_DIR (tokens.csv, sa.key, sa.pub), and CUBE_TEST_PROMETHEUS (the Prometheus server binary, for
# tests that start their own). Logs are in .cube-test/logs/.
#
# Environment: CUBE_CACHE_DIR (default ${XDG_CACHE_HOME:-$HOME/.cache}/cube) keeps the Kubernetes binaries, which
# take minutes to build, outside the work tree.
# shellcheck disable=SC2317 # shellcheck 0.9 takes functions called through variables (ensure's probes) for dead code
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE=$REPO/.cube-test
LOGS=$STATE/logs
PIDS=$STATE/pids
PORTS=$STATE/ports
ENVD=$STATE/env.d
ENV_FILE=$STATE/env
SEED_LDIF=$REPO/scripts/test-env/seed.ldif

KUBE_VERSION=1.20.2
HOME=${HOME:-$(getent passwd "$(id -u)" | cut -d: -f6)}
CACHE_DIR=${CUBE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/cube}
KUBE_CACHE=$CACHE_DIR/kubernetes-$KUBE_VERSION
KUBE_BIN=$KUBE_CACHE/bin
KUBE_BINARIES=(kube-apiserver kube-controller-manager kube-scheduler)
# Names how the cached binaries were built: a change here rebuilds them.
KUBE_RECIPE="debian-source+reflect2-1.0.2"

LDAP_SUFFIX=dc=cube,dc=test
LDAP_ADMIN_DN=cn=admin,$LDAP_SUFFIX
LDAP_ADMIN_PASSWORD=cube-admin-secret

export DEBIAN_FRONTEND=noninteractive

log() { printf 'test-env: %s\n' "$*" >&2; }

# die COMPONENT MESSAGE [LOGFILE]: fails naming the component, with the tail of its log when there is one.
die() {
	local component=$1 message=$2 logfile=${3:-}
	printf 'test-env: %s: FAILED: %s\n' "$component" "$message" >&2
	if [[ -n $logfile && -s $logfile ]]; then
		printf 'test-env: last lines of %s:\n' "$logfile" >&2
		# Only the last start's lines: spawn marks each start with a ===== line.
		awk '/^===== / { n = 0 } { line[n++] = $0 } END { for (i = (n > 40 ? n - 40 : 0); i < n; i++) print line[i] }' \
			"$logfile" | sed 's/^/    /' >&2
	fi
	exit 1
}

# ---------------------------------------------------------------------------------------------------------------
# Debian packages

APT_UPDATED=
apt_update() {
	if [[ -z $APT_UPDATED ]]; then
		log "apt-get update"
		apt-get update -qq >&2 || die apt "apt-get update failed"
		APT_UPDATED=1
	fi
}

have_pkg() { [[ $(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null) == installed ]]; }

# apt_install COMPONENT PACKAGE...: installs the packages that are missing, without starting their system services.
apt_install() {
	local component=$1 missing=() pkg
	shift
	for pkg in "$@"; do have_pkg "$pkg" || missing+=("$pkg"); done
	((${#missing[@]})) || return 0
	[[ $(id -u) == 0 ]] || die "$component" "needs Debian packages ${missing[*]}: run as root or install them"
	apt_update
	log "$component: installing ${missing[*]} from Debian"
	# A package's postinst must not start its system service (slapd on :389, etcd on :2379): we run our own.
	local policy=/usr/sbin/policy-rc.d made_policy=
	if [[ ! -e $policy ]]; then
		printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && made_policy=1
	fi
	local rc=0
	apt-get install -y -qq --no-install-recommends "${missing[@]}" >"$LOGS/apt-$component.log" 2>&1 || rc=$?
	[[ -n $made_policy ]] && rm -f "$policy"
	((rc == 0)) || die "$component" "apt-get install ${missing[*]} failed" "$LOGS/apt-$component.log"
}

# ---------------------------------------------------------------------------------------------------------------
# Processes, ports, settings

# tcp_open PORT: whether something accepts connections on 127.0.0.1:PORT.
tcp_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# port NAME: the loopback port recorded for NAME, or a newly picked free one (recorded for the next `up`).
port() {
	local name=$1 file=$PORTS/$1 p
	if [[ -s $file ]]; then
		cat "$file"
		return
	fi
	for _ in $(seq 200); do
		# Below Linux's ephemeral range (32768-60999), where outgoing connections take their ports.
		p=$((20000 + RANDOM % 12000))
		if ! tcp_open "$p" && ! grep -qsx "$p" "$PORTS"/*; then
			echo "$p" >"$file"
			echo "$p"
			return
		fi
	done
	die "$name" "found no free loopback port"
}

# repick_port NAME: forgets NAME's port when something else holds it, so that port NAME picks a free one.
repick_port() {
	local name=$1
	if [[ -s $PORTS/$name ]] && tcp_open "$(cat "$PORTS/$name")"; then
		log "$name: port $(cat "$PORTS/$name") is taken by another process, picking another"
		rm -f "$PORTS/$name"
	fi
}

pid_of() { [[ -s $PIDS/$1 ]] && cat "$PIDS/$1"; }

# alive NAME: whether NAME's recorded process still runs, is still what we started (not a reused pid), and runs
# the binary now installed (not one since replaced, say by a rebuild).
alive() {
	local pid
	pid=$(pid_of "$1") || return 1
	kill -0 "$pid" 2>/dev/null || return 1
	[[ $(readlink "/proc/$pid/exe" 2>/dev/null) != *" (deleted)" ]] || return 1
	[[ ! -s $PIDS/$1.cmd ]] || tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF "$(cat "$PIDS/$1.cmd")"
}

# spawn NAME COMMAND...: runs COMMAND in its own session, detached, logging to logs/NAME.log.
spawn() {
	local name=$1
	shift
	log "$name: starting ($LOGS/$name.log)"
	printf '\n===== %s starting: %s\n' "$(date -Is)" "$*" >>"$LOGS/$name.log"
	setsid "$@" >>"$LOGS/$name.log" 2>&1 </dev/null &
	echo $! >"$PIDS/$name"
	echo "$1" >"$PIDS/$name.cmd"
}

# stop NAME...: stops the processes of NAME... (TERM to all, then KILL to those left after 15 s), forgets their pids.
stop() {
	local name pid pids=() names=()
	for name in "$@"; do
		if pid=$(pid_of "$name") && kill -0 "$pid" 2>/dev/null; then
			log "$name: stopping (pid $pid)"
			kill "$pid" 2>/dev/null || true
			pids+=("$pid")
			names+=("$name")
		fi
	done
	local i
	for i in "${!pids[@]}"; do
		for _ in $(seq 150); do
			kill -0 "${pids[i]}" 2>/dev/null || break
			sleep 0.1
		done
		if kill -0 "${pids[i]}" 2>/dev/null; then
			log "${names[i]}: still running after 15 s, killing"
			kill -9 "${pids[i]}" 2>/dev/null || true
		fi
	done
	for name in "$@"; do rm -f "$PIDS/$name" "$PIDS/$name.cmd" "$PIDS/$name.args"; done
}

# wait_for NAME SECONDS PROBE...: polls PROBE until it succeeds; fails naming NAME when SECONDS pass or NAME dies,
# showing the end of its log (WAIT_LOG, or logs/NAME.log).
wait_for() {
	local name=$1 seconds=$2
	shift 2
	local deadline=$((SECONDS + seconds)) logfile=${WAIT_LOG:-$LOGS/$name.log}
	until "$@" >/dev/null 2>&1; do
		if [[ -s $PIDS/$name ]] && ! kill -0 "$(cat "$PIDS/$name")" 2>/dev/null; then
			die "$name" "exited while starting" "$logfile"
		fi
		((SECONDS < deadline)) || die "$name" "not healthy after ${seconds}s" "$logfile"
		sleep 0.2
	done
}

# set_env COMPONENT KEY=VALUE...: records the settings COMPONENT gives tests.
set_env() {
	local component=$1
	shift
	printf '%s\n' "$@" >"$ENVD/$component"
}

write_env() {
	local tmp=$ENV_FILE.tmp
	{
		echo "# Written by scripts/test-env.sh: where the test dependencies are. Read by cube-testkit."
		local f
		for f in postgres mysql redis ldap kubernetes prometheus; do
			[[ -s $ENVD/$f ]] && cat "$ENVD/$f"
		done
	} >"$tmp"
	mv "$tmp" "$ENV_FILE"
}

# ---------------------------------------------------------------------------------------------------------------
# PostgreSQL, MariaDB, Redis: the machine's services on their standard ports

postgres_ok() { psql -h 127.0.0.1 -p 5432 -U postgres -d test -w -tAc 'select 1' 2>/dev/null | grep -qx 1; }

up_postgres() {
	command -v psql >/dev/null || apt_install postgres postgresql-client
	if ! postgres_ok; then
		log "postgres: 127.0.0.1:5432 does not answer as postgres@test, setting it up"
		apt_install postgres postgresql
		local version
		version=$(find /etc/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' 2>/dev/null | sort -V | tail -n1)
		[[ -n $version ]] || die postgres "no cluster under /etc/postgresql"
		local hba=/etc/postgresql/$version/main/pg_hba.conf
		if ! grep -q '^# cube test-env' "$hba"; then
			log "postgres: trusting loopback connections in $hba"
			sed -i '1i # cube test-env: loopback connections are trusted\nhost all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
		fi
		if pg_ctlcluster "$version" main status >/dev/null 2>&1; then
			pg_ctlcluster "$version" main reload
		else
			pg_ctlcluster --skip-systemctl-redirect "$version" main start >"$LOGS/postgres.log" 2>&1 ||
				die postgres "pg_ctlcluster start failed" "$LOGS/postgres.log"
		fi
		WAIT_LOG=/var/log/postgresql/postgresql-$version-main.log wait_for postgres 30 psql -h 127.0.0.1 -p 5432 -U postgres -d postgres -w -tAc 'select 1'
		if ! psql -h 127.0.0.1 -U postgres -d postgres -w -tAc "select 1 from pg_database where datname = 'test'" | grep -qx 1; then
			psql -h 127.0.0.1 -U postgres -d postgres -w -qc 'create database test' || die postgres "create database test failed"
		fi
		postgres_ok || die postgres "127.0.0.1:5432 does not answer as postgres@test with trust auth"
	fi
	log "postgres: ok on 127.0.0.1:5432"
	set_env postgres CUBE_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/test
}

mysql_ok() { mariadb -h 127.0.0.1 -P 3306 -u root -D test -Nse 'select 1' 2>/dev/null | grep -qx 1; }

up_mysql() {
	command -v mariadb >/dev/null || apt_install mysql mariadb-client
	if ! mysql_ok; then
		log "mysql: 127.0.0.1:3306 does not answer as root@test, setting it up"
		apt_install mysql mariadb-server
		if ! tcp_open 3306; then
			install -d -o mysql -g mysql /run/mysqld
			# Its log goes where the mysql user may write, which the work tree need not be.
			install -d -o mysql -g adm /var/log/mysql
			start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd -- --user=mysql \
				--bind-address=127.0.0.1 --port=3306 --log-error=/var/log/mysql/error.log ||
				die mysql "start-stop-daemon mariadbd failed" /var/log/mysql/error.log
			local deadline=$((SECONDS + 60))
			until mariadb -u root -Nse 'select 1' >/dev/null 2>&1; do
				((SECONDS < deadline)) || die mysql "mariadbd did not answer within 60s" /var/log/mysql/error.log
				sleep 0.5
			done
		fi
		# Debian's root logs in through the unix socket only: let it in over TCP with an empty password too.
		mariadb -u root -e "ALTER USER root@localhost IDENTIFIED VIA mysql_native_password USING PASSWORD('') OR unix_socket; CREATE DATABASE IF NOT EXISTS test; FLUSH PRIVILEGES" ||
			die mysql "could not give root an empty password and create database test (through the unix socket as root)"
		mysql_ok || die mysql "127.0.0.1:3306 does not answer as root@test with an empty password" /var/log/mysql/error.log
	fi
	log "mysql: ok on 127.0.0.1:3306"
	set_env mysql CUBE_TEST_MYSQL_URL=mysql://root@127.0.0.1:3306/test
}

redis_ok() { [[ $(redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null) == PONG ]]; }

up_redis() {
	command -v redis-cli >/dev/null || apt_install redis redis-tools
	if ! redis_ok; then
		log "redis: 127.0.0.1:6379 does not answer, starting redis-server"
		apt_install redis redis-server
		redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
			--logfile "$LOGS/redis.log" || die redis "redis-server failed to start" "$LOGS/redis.log"
		wait_for redis 30 redis_ok
	fi
	log "redis: ok on 127.0.0.1:6379"
	set_env redis CUBE_TEST_REDIS_URL=redis://127.0.0.1:6379
}

# ---------------------------------------------------------------------------------------------------------------
# OpenLDAP: our own slapd with its own cn=config and database, seeded from scripts/test-env/seed.ldif, serving plain
# LDAP and StartTLS on one port and LDAPS on another, with a certificate from a CA made for the state dir

LDAP_DIR=$STATE/ldap
# Outside LDAP_DIR, which every start rebuilds: the CA stays the same for the life of the state dir.
LDAP_TLS_DIR=$STATE/ldap-tls

# seed_passwords: CUBE_TEST_LDAP_<UID>_PASSWORD=<userPassword> for every user of the seed that has a password.
seed_passwords() {
	awk '
		/^uid: / { uid = toupper(substr($0, 6)); gsub(/[^A-Z0-9]/, "_", uid) }
		/^userPassword: / { pw = substr($0, 15) }
		/^$/ { if (uid != "" && pw != "") print "CUBE_TEST_LDAP_" uid "_PASSWORD=" pw; uid = ""; pw = "" }
		END { if (uid != "" && pw != "") print "CUBE_TEST_LDAP_" uid "_PASSWORD=" pw }
	' "$SEED_LDIF"
}

ldap_ok() {
	local port
	port=$(cat "$PORTS/ldap" 2>/dev/null) || return 1
	ldapwhoami -x -H "ldap://127.0.0.1:$port/" -D "$LDAP_ADMIN_DN" -w "$LDAP_ADMIN_PASSWORD" >/dev/null 2>&1
}

# ldap_tls_ok: whether slapd answers over LDAPS and over StartTLS with a certificate that our CA verifies.
ldap_tls_ok() {
	local port tlsport
	port=$(cat "$PORTS/ldap" 2>/dev/null) || return 1
	tlsport=$(cat "$PORTS/ldaps" 2>/dev/null) || return 1
	LDAPTLS_CACERT=$LDAP_TLS_DIR/ca.pem LDAPTLS_REQCERT=demand ldapwhoami -x -H "ldaps://127.0.0.1:$tlsport/" \
		-D "$LDAP_ADMIN_DN" -w "$LDAP_ADMIN_PASSWORD" >/dev/null 2>&1 &&
		LDAPTLS_CACERT=$LDAP_TLS_DIR/ca.pem LDAPTLS_REQCERT=demand ldapwhoami -x -ZZ -H "ldap://127.0.0.1:$port/" \
			-D "$LDAP_ADMIN_DN" -w "$LDAP_ADMIN_PASSWORD" >/dev/null 2>&1
}

ldap_ready() { ldap_ok && ldap_tls_ok; }

# ldap_tls_files: makes, once per state dir, a self-signed CA and a server certificate it signs for 127.0.0.1 and
# localhost (v3 extensions as rustls/webpki demand them: a CA:TRUE root, a serverAuth leaf with subjectAltNames).
ldap_tls_files() {
	local dir=$LDAP_TLS_DIR
	[[ -s $dir/ca.pem && -s $dir/server.pem && -s $dir/server.key ]] && return 0
	command -v openssl >/dev/null || apt_install ldap openssl
	log "ldap: generating a test CA and a server certificate in $dir"
	rm -rf "$dir"
	mkdir -p "$dir"
	local tlslog=$LOGS/ldap-tls.log
	: >"$tlslog"
	(
		umask 077
		openssl req -x509 -new -nodes -newkey rsa:2048 -sha256 -days 3650 -subj "/CN=Cube test CA" \
			-addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
			-keyout "$dir/ca.key" -out "$dir/ca.pem" &&
			openssl req -new -nodes -newkey rsa:2048 -sha256 -subj "/CN=localhost" \
				-keyout "$dir/server.key" -out "$dir/server.csr" &&
			printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature,keyEncipherment" \
				"extendedKeyUsage=serverAuth" "subjectAltName=IP:127.0.0.1,DNS:localhost" >"$dir/server.ext" &&
			openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" \
				-set_serial "0x$(openssl rand -hex 16)" -sha256 -days 3650 -extfile "$dir/server.ext" -out "$dir/server.pem"
	) >>"$tlslog" 2>&1 || die ldap "openssl could not make the test certificates" "$tlslog"
	chmod 644 "$dir/ca.pem" "$dir/server.pem"
	rm -f "$dir/server.csr" "$dir/server.ext"
}

up_ldap() {
	if ! have_pkg slapd; then
		# Debian's slapd must not make a directory of its own: we never use the system instance.
		echo 'slapd slapd/no_configuration boolean true' | debconf-set-selections
	fi
	apt_install ldap slapd ldap-utils
	[[ -s $SEED_LDIF ]] || die ldap "missing seed $SEED_LDIF"
	local seed_sum
	seed_sum=$(sha256sum <"$SEED_LDIF")
	ldap_tls_files
	if alive ldap && ldap_ready && [[ $(cat "$LDAP_DIR/seed.sha256" 2>/dev/null) == "$seed_sum" ]]; then
		log "ldap: already running on 127.0.0.1:$(cat "$PORTS/ldap") (ldaps on $(cat "$PORTS/ldaps"))"
	else
		stop ldap
		repick_port ldap
		repick_port ldaps
		local port tlsport
		port=$(port ldap)
		tlsport=$(port ldaps)
		# The database is rebuilt from the seed on every start, so a restarted slapd holds exactly the seed.
		rm -rf "$LDAP_DIR"
		mkdir -p "$LDAP_DIR/slapd.d" "$LDAP_DIR/data"
		local hash
		hash=$(slappasswd -s "$LDAP_ADMIN_PASSWORD")
		cat >"$LDAP_DIR/config.ldif" <<-EOF
			dn: cn=config
			objectClass: olcGlobal
			cn: config
			olcPidFile: $LDAP_DIR/slapd.pid
			olcArgsFile: $LDAP_DIR/slapd.args
			olcTLSCACertificateFile: $LDAP_TLS_DIR/ca.pem
			olcTLSCertificateFile: $LDAP_TLS_DIR/server.pem
			olcTLSCertificateKeyFile: $LDAP_TLS_DIR/server.key

			dn: cn=module{0},cn=config
			objectClass: olcModuleList
			cn: module{0}
			olcModulePath: /usr/lib/ldap
			olcModuleLoad: back_mdb

			dn: cn=schema,cn=config
			objectClass: olcSchemaConfig
			cn: schema

			include: file:///etc/ldap/schema/core.ldif
			include: file:///etc/ldap/schema/cosine.ldif
			include: file:///etc/ldap/schema/nis.ldif
			include: file:///etc/ldap/schema/inetorgperson.ldif

			dn: olcDatabase={-1}frontend,cn=config
			objectClass: olcDatabaseConfig
			objectClass: olcFrontendConfig
			olcDatabase: {-1}frontend
			olcSizeLimit: 500

			dn: olcDatabase={0}config,cn=config
			objectClass: olcDatabaseConfig
			olcDatabase: {0}config
			olcAccess: {0}to * by * none

			dn: olcDatabase={1}mdb,cn=config
			objectClass: olcDatabaseConfig
			objectClass: olcMdbConfig
			olcDatabase: {1}mdb
			olcSuffix: $LDAP_SUFFIX
			olcRootDN: $LDAP_ADMIN_DN
			olcRootPW: $hash
			olcDbDirectory: $LDAP_DIR/data
			olcDbMaxSize: 104857600
			olcDbIndex: objectClass eq
			olcDbIndex: uid,cn,mail eq
			olcDbIndex: member eq
			olcAccess: {0}to attrs=userPassword by self write by anonymous auth by * none
			olcAccess: {1}to * by * read
		EOF
		slapadd -n0 -F "$LDAP_DIR/slapd.d" -l "$LDAP_DIR/config.ldif" >"$LOGS/ldap.log" 2>&1 ||
			die ldap "slapadd of the cn=config LDIF failed" "$LOGS/ldap.log"
		slapadd -n1 -F "$LDAP_DIR/slapd.d" -l "$SEED_LDIF" >>"$LOGS/ldap.log" 2>&1 ||
			die ldap "slapadd of $SEED_LDIF failed" "$LOGS/ldap.log"
		echo "$seed_sum" >"$LDAP_DIR/seed.sha256"
		# -d keeps slapd in the foreground (so our pid is its pid); "none" still logs its errors, not every operation.
		spawn ldap /usr/sbin/slapd -d none -h "ldap://127.0.0.1:$port/ ldaps://127.0.0.1:$tlsport/" -F "$LDAP_DIR/slapd.d"
		wait_for ldap 30 ldap_ready
		log "ldap: running on 127.0.0.1:$port (StartTLS too) and ldaps on 127.0.0.1:$tlsport"
	fi
	local passwords
	mapfile -t passwords < <(seed_passwords)
	set_env ldap \
		"CUBE_TEST_LDAP_URL=ldap://127.0.0.1:$(cat "$PORTS/ldap")" \
		"CUBE_TEST_LDAPS_URL=ldaps://127.0.0.1:$(cat "$PORTS/ldaps")" \
		"CUBE_TEST_LDAP_CA_FILE=$LDAP_TLS_DIR/ca.pem" \
		"CUBE_TEST_LDAP_BASE_DN=$LDAP_SUFFIX" \
		"CUBE_TEST_LDAP_ADMIN_DN=$LDAP_ADMIN_DN" \
		"CUBE_TEST_LDAP_ADMIN_PASSWORD=$LDAP_ADMIN_PASSWORD" \
		"${passwords[@]}"
}

# ---------------------------------------------------------------------------------------------------------------
# Kubernetes: binaries built once from Debian's source package, cached outside the work tree

kube_binaries_ok() {
	local b
	for b in "${KUBE_BINARIES[@]}"; do [[ -x $KUBE_BIN/$b ]] || return 1; done
	[[ $(cat "$KUBE_BIN/.recipe" 2>/dev/null) == "$KUBE_RECIPE" ]]
}

build_kube() {
	kube_binaries_ok && return 0
	mkdir -p "$KUBE_CACHE"
	exec 9>"$KUBE_CACHE/.lock"
	if ! flock -n 9; then
		log "kubernetes: another build holds $KUBE_CACHE/.lock, waiting for it"
		flock 9
	fi
	if kube_binaries_ok; then
		exec 9>&-
		return 0
	fi
	local build_log=$LOGS/kube-build.log started=$SECONDS
	log "kubernetes: building ${KUBE_BINARIES[*]} v$KUBE_VERSION from Debian's source package (several minutes; log $build_log)"
	: >"$build_log"
	if ! grep -rqs '^Types:.*deb-src' /etc/apt/sources.list.d/ && ! grep -qs '^deb-src' /etc/apt/sources.list; then
		local src=/etc/apt/sources.list.d/debian.sources
		[[ -s $src ]] || die kubernetes "no $src to copy a deb-src entry from"
		log "kubernetes: adding deb-src entries (/etc/apt/sources.list.d/cube-deb-src.sources)"
		sed 's/^Types: deb$/Types: deb-src/' "$src" >/etc/apt/sources.list.d/cube-deb-src.sources
		APT_UPDATED=
	fi
	apt_install kubernetes golang-go rsync make dpkg-dev golang-github-modern-go-reflect2-dev
	apt_update
	local build=$KUBE_CACHE/build
	rm -rf "$build"
	mkdir -p "$build"
	log "kubernetes: apt-get source kubernetes"
	(cd "$build" && apt-get source kubernetes) >>"$build_log" 2>&1 || die kubernetes "apt-get source kubernetes failed" "$build_log"
	local tree
	tree=$(find "$build" -mindepth 1 -maxdepth 1 -type d -name 'kubernetes-*' | head -n1)
	[[ -n $tree && -f $tree/hack/lib/version.sh ]] || die kubernetes "apt-get source left no kubernetes tree in $build" "$build_log"
	grep -q "tag: v$KUBE_VERSION'" "$tree/hack/lib/version.sh" ||
		die kubernetes "Debian's kubernetes source is not v$KUBE_VERSION (see $tree/hack/lib/version.sh)"
	# Kubernetes 1.20 vendors reflect2 1.0.1, whose map iteration crashes (SIGSEGV in json-iterator) when built with
	# Go >= 1.18 such as bookworm's 1.19: vendor Debian's reflect2 1.0.2 instead, as Kubernetes itself did later.
	local reflect2=/usr/share/gocode/src/github.com/modern-go/reflect2
	[[ -f $reflect2/go_above_118.go ]] || die kubernetes "Debian's reflect2 in $reflect2 is not 1.0.2"
	log "kubernetes: vendoring reflect2 1.0.2 (Go 1.18+ fix)"
	rsync -a --delete --exclude '*_test.go' --exclude .git "$reflect2/" "$tree/vendor/github.com/modern-go/reflect2/"
	log "kubernetes: make (GOPATH mode, as in debian/rules)"
	(
		cd "$tree"
		mkdir -p .go/src/k8s.io
		[[ -L .go/src/k8s.io/kubernetes ]] || ln -s ../../.. .go/src/k8s.io/kubernetes
		export GOPATH=$tree/.go CGO_ENABLED=0 PATH=/usr/lib/go/bin:$PATH
		make WHAT="cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler"
	) >>"$build_log" 2>&1 || die kubernetes "make failed" "$build_log"
	rm -rf "$KUBE_BIN.tmp"
	mkdir -p "$KUBE_BIN.tmp"
	local b
	for b in "${KUBE_BINARIES[@]}"; do
		install -m 0755 "$tree/_output/bin/$b" "$KUBE_BIN.tmp/$b" || die kubernetes "the build made no $b" "$build_log"
	done
	echo "$KUBE_RECIPE" >"$KUBE_BIN.tmp/.recipe"
	rm -rf "$KUBE_BIN"
	mv "$KUBE_BIN.tmp" "$KUBE_BIN"
	rm -rf "$build"
	exec 9>&-
	log "kubernetes: built in $((SECONDS - started))s, cached in $KUBE_BIN"
}

# ---------------------------------------------------------------------------------------------------------------
# Kubernetes: etcd and a control plane without kubelets; tests make fake Nodes and play the kubelet themselves

KUBE_DIR=$STATE/kubernetes
KUBECONFIG_FILE=$KUBE_DIR/kubeconfig
KUBECONFIG_B_FILE=$KUBE_DIR/kubeconfig-b

# ensure NAME SECONDS PROBE ARGS_FN PORT...: reuses NAME when it runs and answers PROBE with the command ARGS_FN
# builds (into CMD), else (re)starts it, on its recorded ports when they are still free, and waits for PROBE.
ensure() {
	local name=$1 seconds=$2 probe=$3 args_fn=$4
	shift 4
	if alive "$name"; then
		"$args_fn"
		if [[ $(cat "$PIDS/$name.args" 2>/dev/null) == "$(printf '%q ' "${CMD[@]}")" ]] && "$probe" >/dev/null 2>&1; then
			log "$name: already running (pid $(pid_of "$name"))"
			return
		fi
		log "$name: running but unhealthy or started with other settings, restarting"
	fi
	stop "$name"
	local p
	for p in "$@"; do repick_port "$p"; done
	"$args_fn"
	spawn "$name" "${CMD[@]}"
	printf '%q ' "${CMD[@]}" >"$PIDS/$name.args"
	wait_for "$name" "$seconds" "$probe"
	log "$name: healthy"
}

kube_token() { cut -d, -f1 "$KUBE_DIR/tokens.csv"; }

etcd_ok() {
	curl -fsS --max-time 2 "http://127.0.0.1:$(cat "$PORTS/etcd-client")/health" | grep -q '"health":"true"'
}

etcd_args() {
	local client peer
	client=$(port etcd-client)
	peer=$(port etcd-peer)
	# A data directory remembers its member's peer URL: start afresh when the ports changed.
	if [[ $(cat "$KUBE_DIR/etcd.ports" 2>/dev/null) != "$client $peer" ]] && ! alive etcd; then
		rm -rf "$KUBE_DIR/etcd"
		echo "$client $peer" >"$KUBE_DIR/etcd.ports"
	fi
	CMD=(/usr/bin/etcd --name cube-test --data-dir "$KUBE_DIR/etcd" --logger zap --log-outputs stderr
		--listen-client-urls "http://127.0.0.1:$client" --advertise-client-urls "http://127.0.0.1:$client"
		--listen-peer-urls "http://127.0.0.1:$peer" --initial-advertise-peer-urls "http://127.0.0.1:$peer"
		--initial-cluster "cube-test=http://127.0.0.1:$peer" --initial-cluster-state new
		--listen-metrics-urls "" --quota-backend-bytes 1073741824)
}

apiserver_ok() {
	[[ $(curl -fsk --max-time 3 -H "Authorization: Bearer $(kube_token)" \
		"https://127.0.0.1:$(cat "$PORTS/kube-apiserver")/readyz") == ok ]]
}

# apiserver_args_for NAME PKI_DIR ETCD_PREFIX: the command of an API server; two of them on one etcd, each under
# its own prefix, are two separate clusters.
apiserver_args_for() {
	CMD=("$KUBE_BIN/kube-apiserver"
		--etcd-servers "http://127.0.0.1:$(port etcd-client)" --etcd-prefix "$3"
		--bind-address 127.0.0.1 --advertise-address 127.0.0.1
		--secure-port "$(port "$1")" --insecure-port 0
		--cert-dir "$2"
		--token-auth-file "$KUBE_DIR/tokens.csv"
		--authorization-mode RBAC
		--service-account-key-file "$KUBE_DIR/sa.pub"
		--service-account-signing-key-file "$KUBE_DIR/sa.key"
		--service-account-issuer https://kubernetes.default.svc.cluster.local
		--disable-admission-plugins ServiceAccount
		--service-cluster-ip-range 10.96.0.0/16
		--endpoint-reconciler-type none
		--allow-privileged=true --profiling=false)
}
apiserver_args() { apiserver_args_for kube-apiserver "$KUBE_DIR/pki" /registry; }
# The second cluster (`b`): an API server only, so its pods stay unscheduled unless a test binds them.
apiserver_b_args() { apiserver_args_for kube-apiserver-b "$KUBE_DIR/pki-b" /registry-b; }
apiserver_b_ok() {
	[[ $(curl -fsk --max-time 3 -H "Authorization: Bearer $(kube_token)" \
		"https://127.0.0.1:$(cat "$PORTS/kube-apiserver-b")/readyz") == ok ]]
}

# secure_healthz_ok PORT_NAME: whether the component serving on that port answers /healthz with ok.
secure_healthz_ok() { [[ $(curl -fsk --max-time 2 "https://127.0.0.1:$(cat "$PORTS/$1")/healthz") == ok ]]; }
controller_manager_ok() { secure_healthz_ok kube-controller-manager; }
scheduler_ok() { secure_healthz_ok kube-scheduler; }

controller_manager_args() {
	CMD=("$KUBE_BIN/kube-controller-manager"
		--kubeconfig "$KUBECONFIG_FILE"
		--authentication-kubeconfig "$KUBECONFIG_FILE" --authorization-kubeconfig "$KUBECONFIG_FILE"
		--controllers '*,-nodelifecycle,-serviceaccount-token'
		--leader-elect=false
		--port 0 --bind-address 127.0.0.1 --secure-port "$(port kube-controller-manager)"
		--profiling=false)
}

scheduler_args() {
	CMD=("$KUBE_BIN/kube-scheduler"
		--kubeconfig "$KUBECONFIG_FILE"
		--authentication-kubeconfig "$KUBECONFIG_FILE" --authorization-kubeconfig "$KUBECONFIG_FILE"
		--leader-elect=false
		--port 0 --bind-address 127.0.0.1 --secure-port "$(port kube-scheduler)"
		--profiling=false)
}

# write_kubeconfig NAME PKI_DIR FILE: the kubeconfig of API server NAME.
write_kubeconfig() {
	local name=$1 ca=$2/apiserver.crt file=$3 tmp=$3.tmp
	[[ -s $ca ]] || die "$name" "it wrote no $ca" "$LOGS/$name.log"
	cat >"$tmp" <<-EOF
		# Written by scripts/test-env.sh: the admin (system:masters) of the test control plane.
		apiVersion: v1
		kind: Config
		clusters:
		- name: cube-test
		  cluster:
		    server: https://127.0.0.1:$(port "$name")
		    certificate-authority-data: $(base64 -w0 "$ca")
		users:
		- name: cube-admin
		  user:
		    token: $(kube_token)
		contexts:
		- name: cube-test
		  context:
		    cluster: cube-test
		    user: cube-admin
		    namespace: default
		current-context: cube-test
	EOF
	mv "$tmp" "$file"
}

up_kubernetes() {
	build_kube
	apt_install kubernetes etcd-server openssl curl
	mkdir -p "$KUBE_DIR/pki"
	if [[ ! -s $KUBE_DIR/sa.key || ! -s $KUBE_DIR/sa.pub ]]; then
		log "kubernetes: generating the service-account key pair"
		openssl genrsa -out "$KUBE_DIR/sa.key" 2048 2>/dev/null || die kubernetes "openssl genrsa failed"
		openssl rsa -in "$KUBE_DIR/sa.key" -pubout -out "$KUBE_DIR/sa.pub" 2>/dev/null || die kubernetes "openssl rsa failed"
	fi
	if [[ ! -s $KUBE_DIR/tokens.csv ]]; then
		(umask 077 && echo "$(openssl rand -hex 24),cube-admin,cube-admin,\"system:masters\"" >"$KUBE_DIR/tokens.csv")
	fi
	ensure etcd 60 etcd_ok etcd_args etcd-client etcd-peer
	ensure kube-apiserver 120 apiserver_ok apiserver_args kube-apiserver
	write_kubeconfig kube-apiserver "$KUBE_DIR/pki" "$KUBECONFIG_FILE"
	mkdir -p "$KUBE_DIR/pki-b"
	ensure kube-apiserver-b 120 apiserver_b_ok apiserver_b_args kube-apiserver-b
	write_kubeconfig kube-apiserver-b "$KUBE_DIR/pki-b" "$KUBECONFIG_B_FILE"
	ensure kube-controller-manager 60 controller_manager_ok controller_manager_args kube-controller-manager
	ensure kube-scheduler 60 scheduler_ok scheduler_args kube-scheduler
	log "kubernetes: ok on https://127.0.0.1:$(port kube-apiserver) (kubeconfig $KUBECONFIG_FILE)"
	set_env kubernetes "CUBE_TEST_KUBECONFIG=$KUBECONFIG_FILE" "CUBE_TEST_KUBECONFIG_B=$KUBECONFIG_B_FILE" \
		"CUBE_TEST_KUBE_APISERVER=$KUBE_BIN/kube-apiserver" "CUBE_TEST_ETCD_URL=http://127.0.0.1:$(port etcd-client)" \
		"CUBE_TEST_KUBE_DIR=$KUBE_DIR"
}

# ---------------------------------------------------------------------------------------------------------------
# Prometheus: only the server binary, from Debian; each test starts its own server, scraping an exporter it serves

PROMETHEUS_BIN=/usr/bin/prometheus

up_prometheus() {
	# apt_install keeps the package's postinst from starting the system service (on :9090): we never use it.
	apt_install prometheus prometheus
	[[ -x $PROMETHEUS_BIN ]] || die prometheus "the prometheus package installed no $PROMETHEUS_BIN"
	"$PROMETHEUS_BIN" --version >"$LOGS/prometheus.log" 2>&1 ||
		die prometheus "$PROMETHEUS_BIN --version failed" "$LOGS/prometheus.log"
	log "prometheus: ok ($PROMETHEUS_BIN; tests start their own servers)"
	set_env prometheus "CUBE_TEST_PROMETHEUS=$PROMETHEUS_BIN"
}

# ---------------------------------------------------------------------------------------------------------------

init_state() { mkdir -p "$LOGS" "$PIDS" "$PORTS" "$ENVD"; }

ALL_COMPONENTS=(postgres mysql redis ldap kubernetes prometheus)
# Our own processes, in the order `down` stops them.
OWN_PROCESSES=(kube-scheduler kube-controller-manager kube-apiserver-b kube-apiserver etcd ldap)

cmd_up() {
	local started=$SECONDS components=("$@") c
	((${#components[@]})) || components=("${ALL_COMPONENTS[@]}")
	for c in "${components[@]}"; do
		[[ " ${ALL_COMPONENTS[*]} " == *" $c "* ]] || die "$c" "unknown component (known: ${ALL_COMPONENTS[*]})"
	done
	init_state
	for c in "${components[@]}"; do
		"up_$c"
		write_env
	done
	log "up in $((SECONDS - started))s; settings in $ENV_FILE"
}

cmd_down() {
	[[ -d $STATE ]] || return 0
	stop "${OWN_PROCESSES[@]}"
	rm -f "$ENVD/ldap" "$ENVD/kubernetes"
	write_env
	log "down: stopped slapd and the Kubernetes control plane (PostgreSQL, MariaDB, Redis are the machine's, left running)"
}

cmd_status() {
	local name
	for name in "${OWN_PROCESSES[@]}"; do
		if alive "$name"; then
			printf '%-24s running (pid %s)\n' "$name" "$(pid_of "$name")"
		else
			printf '%-24s stopped\n' "$name"
		fi
	done
	postgres_ok && echo "postgres                 ok" || echo "postgres                 not answering"
	mysql_ok && echo "mysql                    ok" || echo "mysql                    not answering"
	redis_ok && echo "redis                    ok" || echo "redis                    not answering"
}

main() {
	local command=${1:-}
	shift || true
	case $command in
	up) cmd_up "$@" ;;
	down) cmd_down ;;
	env)
		[[ -s $ENV_FILE ]] || die env "no $ENV_FILE: run \`$0 up\` first"
		cat "$ENV_FILE"
		;;
	status) cmd_status ;;
	purge)
		cmd_down
		rm -rf "$STATE"
		log "purge: removed $STATE (the Kubernetes binaries stay cached in $KUBE_BIN)"
		;;
	build-kube)
		init_state
		build_kube
		;;
	*)
		echo "usage: $0 up [${ALL_COMPONENTS[*]}] | down | env | status | purge | build-kube" >&2
		exit 2
		;;
	esac
}

# On one line, so that editing this file while it runs cannot feed bash the rest.
main "$@"; exit
