# A real KMIP server for the TAP tests: Debian's pykmip-server (PyKMIP), on
# 127.0.0.1 with a test PKI (KeyManagerEmulator::make_pki), its own
# configuration, policy directory and SQLite database in a temporary
# directory. Nothing here was written for pgphi's benefit: the server and the
# administrator's client (test/kmip/kmip_admin.py, on PyKMIP's client) are
# PyKMIP's.
package KmipServer;

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use IO::Socket::INET;
use Time::HiRes qw(usleep);

# Debian's interpreter, whose dist-packages hold PyKMIP (a python3 earlier
# in PATH may not).
my $python = '/usr/bin/python3';

# new(pki => DIR, dir => DIR)
sub new
{
	my ($class, %params) = @_;
	my $self = bless {%params}, $class;
	$self->{port} = PostgreSQL::Test::Cluster::get_free_port();
	mkdir $self->{dir};
	mkdir "$self->{dir}/policies";
	$self->{log} = "$self->{dir}/server.log";
	open(my $conf, '>', "$self->{dir}/server.conf") or die "server.conf: $!";
	print $conf <<CONF;
[server]
hostname=127.0.0.1
port=$self->{port}
certificate_path=$self->{pki}/server.pem
key_path=$self->{pki}/server.key
ca_path=$self->{pki}/ca.pem
auth_suite=TLS1.2
policy_path=$self->{dir}/policies
enable_tls_client_auth=True
logging_level=INFO
database_path=$self->{dir}/pykmip.db
CONF
	close $conf;
	$self->start;
	return $self;
}

sub port { my ($self) = @_; return $self->{port}; }

sub listening
{
	my ($self) = @_;
	my $socket = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $self->{port}, Timeout => 1);
	return 0 unless $socket;
	close $socket;
	return 1;
}

sub start
{
	my ($self) = @_;
	my $pid = fork();
	die "fork: $!" unless defined $pid;
	if ($pid == 0)
	{
		# A process group of its own: the server starts a child (its policy
		# file monitor) that must go away with it.
		setpgrp(0, 0);
		open(STDOUT, '>>', "$self->{dir}/stdout") or die;
		open(STDERR, '>&', \*STDOUT) or die;
		exec('/usr/bin/pykmip-server', '-f', "$self->{dir}/server.conf", '-l', $self->{log})
		  or die "exec pykmip-server: $!";
	}
	$self->{pid} = $pid;
	for (1 .. 300)
	{
		return if $self->listening;
		die "pykmip-server exited; see $self->{dir}/stdout" if waitpid($pid, 1) == $pid;
		usleep(100_000);
	}
	die "pykmip-server did not listen on port $self->{port}";
}

# The server goes away at once, as in a crash (pykmip-server takes about ten
# seconds to stop on SIGTERM), with its child; its SQLite database survives.
sub stop
{
	my ($self) = @_;
	my $pid = delete $self->{pid} or return;
	kill 'KILL', -$pid;    # the server's process group
	waitpid($pid, 0);
}

sub DESTROY { my ($self) = @_; $self->stop; }

# Runs the administrator's client: create NAME, state UID, revoke UID, ...
sub admin
{
	my ($self, @args) = @_;
	my ($stdout, $stderr);
	IPC::Run::run([ $python, "$ENV{PGPHI_TEST_DIR}/kmip/kmip_admin.py", $self->{pki}, $self->{port}, @args ],
		'>', \$stdout, '2>', \$stderr)
	  or die "kmip_admin.py @args failed: $stderr";
	chomp $stdout;
	return $stdout;
}

# How many times the server has processed `operation` (its log line
# "Processing operation: Decrypt"), counted at the server.
sub operations
{
	my ($self, $operation) = @_;
	open(my $log, '<', $self->{log}) or return 0;
	my $n = grep { /Processing operation: \Q$operation\E$/ } <$log>;
	close $log;
	return $n;
}

sub postgres_settings
{
	my ($self, %params) = @_;
	my $cert = $params{cert} // 'client';
	return <<CONF;
pgphi.kmip_host = '127.0.0.1'
pgphi.kmip_port = $self->{port}
pgphi.kmip_client_cert = '$self->{pki}/$cert.pem'
pgphi.kmip_client_key = '$self->{pki}/$cert.key'
pgphi.kmip_ca = '$self->{pki}/ca.pem'
CONF
}

1;
