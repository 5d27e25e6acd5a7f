-- Run once by the postgres image on an empty data volume (/docker-entrypoint-initdb.d):
-- one database for the MLflow backend store and one for the Prefect server.
CREATE DATABASE mlflow;
CREATE DATABASE prefect;
