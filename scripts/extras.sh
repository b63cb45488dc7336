# The extras of adapterserve that the project's own environment installs (sourced by setup.sh and
# update-lock.sh, so the lock pins exactly what CI installs).
ADAPTERSERVE_EXTRAS="server,train,http,ray,dev"
